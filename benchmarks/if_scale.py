"""DeepFloyd IF at its published sizes on this machine, with random bf16 weights: IF-I-XL
(4.3B) with a T5-XXL encoder (4.8B), then a 64 -> 256 px stage of IF-II-L's size, then the
Stable Diffusion x4 upscaler (random float32 weights, benchmarks/x4_parts.py) as stage III,
256 -> 1024 px.

It writes the three parts as diffusers pipeline folders (about 20 GB of bf16 weights, built
tensor by tensor: no float32 copy is ever held), imports them with ``imagen import`` (hard
links), then measures, each in a fresh process:
- ``imagen sample`` of one prompt through both stages with a few steps per stage: wall time
  and peak RSS (the low-memory mode holds one part at a time);
- seconds per guided U-Net evaluation of IF-I-XL (batch 2: the text and null halves), ours
  against diffusers' own ``UNet2DConditionModel`` forward on the same weights in bf16 (the
  dtype diffusers holds them in; where the CPU has no fast bf16 that forward is emulated, and
  it is stopped at ``--timeout`` and reported as at least that);
- the same for IF-II at 256 px (ours), and for the x4 upscaler at a 256^2 latent in float32,
  ours against diffusers' forward in float32 on the same weights;
- the fraction of this CPU's matmul peak (measured in the same run, in the dtype each
  evaluation ran in) each big stage's evaluation reached, its FLOPs counted from the layer
  shapes on the meta device (benchmarks/x4_parts.py), and the VAE decode's FLOPs.

IF-II-L's configuration is not published outside the gated repo; the stand-in has IF-II's
layout as diffusers' ``scripts/convert_if.py`` describes it (five levels with 2, 2, 3, 5, 5
residual blocks, attention at the two lowest resolutions, noise level as class labels) with
widths 256-1280, 1.34B parameters against the published 1.2B.

    python benchmarks/if_scale.py [--work DIR] [--steps 2] [--threads 2] [--keep]

Writes benchmarks/results/if_scale-cpu-DATE.json. Needs about 45 GB of free disk while it
runs (the folders, then the links into the model directory) and 12 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import matmul_peak, write
from x4_parts import EVAL as STAGE_EVAL
from x4_parts import eval_flops, vae_decode_flops, write_x4

GN = dict(cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu")
TEXT = dict(addition_embed_type="text", encoder_hid_dim=4096, attention_head_dim=64)
IF_I_XL = dict(
    sample_size=64,
    in_channels=3,
    out_channels=6,
    block_out_channels=[704, 1408, 2112, 2816],
    layers_per_block=3,
    down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    cross_attention_dim=2816,
    addition_embed_type_num_heads=64,
    **GN,
    **TEXT,
)
IF_II_L_STAND_IN = dict(
    sample_size=256,
    in_channels=6,
    out_channels=6,
    block_out_channels=[256, 512, 768, 1024, 1280],
    layers_per_block=[2, 2, 3, 5, 5],
    down_block_types=["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"] * 2,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 3,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    cross_attention_dim=1280,
    addition_embed_type_num_heads=64,
    class_embed_type="timestep",
    time_embedding_act_fn="gelu",
    resnet_skip_time_act=True,
    resnet_out_scale_factor=1 / 0.7071,
    mid_block_scale_factor=1 / 0.7071,
    **GN,
    **TEXT,
)
T5_XXL = dict(  # google/t5-v1_1-xxl's encoder
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
)
TINY_T5 = {**T5_XXL, "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16}
TINY_I = {
    **IF_I_XL,
    "block_out_channels": [64, 128, 128, 128],
    "layers_per_block": 1,
    "cross_attention_dim": 128,
    "encoder_hid_dim": 64,
    "addition_embed_type_num_heads": 2,
    "norm_num_groups": 32,
}
TINY_II = {
    **IF_II_L_STAND_IN,
    "block_out_channels": [32, 32, 64, 64, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "encoder_hid_dim": 64,
    "addition_embed_type_num_heads": 2,
}
PROMPT = "a photograph of a golden retriever in a beret"


def random_bf16(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 tensors of the given shapes, drawn in bf16 (never float32 whole)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.bfloat16)
        t.normal_(0.0, 0.02, generator=g)
        out[name] = t
    return out


def write_unet(folder: Path, config: dict, seed: int) -> int:
    """A diffusers ``unet/`` folder with random bf16 weights; returns the parameter count."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(model.config), indent=2))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = random_bf16(shapes, seed)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return sum(v.numel() for v in state.values())


def write_t5(root: Path, t5: dict) -> int:
    """``text_encoder/`` (T5-XXL's encoder, random bf16) and ``tokenizer/`` (a small
    sentencepiece model: the ids, not the words, matter here)."""
    import sentencepiece as spm
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    (root / "tokenizer").mkdir(parents=True)
    corpus = [PROMPT, "a photo of a cat", "an oil painting of a harbour at dawn"] * 8
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(root / "tokenizer" / "spiece"),
        vocab_size=30,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    T5Tokenizer.from_pretrained(str(root / "tokenizer")).save_pretrained(root / "tokenizer")
    config = T5Config(**t5)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    shapes = {
        k: v.shape for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"
    }
    state = random_bf16(shapes, 0)
    config.save_pretrained(root / "text_encoder")
    save_file(state, str(root / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    return sum(v.numel() for v in state.values())


def write_pipeline(root: Path, sr: bool, unet: dict) -> int:
    """A diffusers IFPipeline / IFSuperResolutionPipeline folder at ``root``."""
    from diffusers import DDPMScheduler

    root.mkdir(parents=True)
    index = {
        "_class_name": "IFSuperResolutionPipeline" if sr else "IFPipeline",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "watermarker": [None, None],
        "requires_safety_checker": False,
    }
    DDPMScheduler(
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0 if sr else 1.5,
    ).save_config(root / "scheduler")
    if sr:
        index["image_noising_scheduler"] = ["diffusers", "DDPMScheduler"]
        DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_config(
            root / "image_noising_scheduler"
        )
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return write_unet(root / "unet", unet, 1 if sr else 2)


def run_measured(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd`` in a fresh process: its wall seconds, its own peak RSS (GB, from the
    rusage of the wait that reaps it), exit status and last output line (a JSON line where
    the command prints one); killed after ``timeout`` seconds."""
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        log.seek(0)
        out = log.read().strip()
    row = {"wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}
    if wall >= timeout:
        return {**row, "timed_out_after_s": timeout}
    row["returncode"] = proc.returncode
    last = out.splitlines()[-1] if out else ""
    try:
        row.update(json.loads(last))
    except json.JSONDecodeError:
        row["last_line"] = last[-300:]
    return row


EVAL = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
kind, path = sys.argv[1], sys.argv[2]
size, width = int(sys.argv[5]), int(sys.argv[6])
x = torch.randn(1, 3, size, size)
text = torch.randn(1, 77, width)
if kind == "ours":
    from imagen.models.cascade import load_cascade
    from imagen.text.encoders import TextEmbedding
    cascade = load_cascade(path, low_memory=True)
    stage = cascade.stages[0]
    cascade.low_memory.materialise(stage, 0)
    cond = stage.condition(TextEmbedding(text, torch.ones(1, 77, dtype=torch.bool)))
    denoise = stage.denoiser(cond, stage.config.sampling)  # guidance 7: one batch-2 pass
    run = lambda: denoise(x, 500)
else:
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    xb, tb = torch.cat([x, x]).bfloat16(), torch.cat([text, text]).bfloat16()
    run = lambda: unet(xb, 500, encoder_hidden_states=tb, return_dict=False)[0]
times = []
with torch.no_grad():
    for i in range(int(sys.argv[4]) + 1):
        t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
print(json.dumps({"first_s": round(times[0], 2), "s_per_eval": round(sorted(times[1:])[len(times[1:]) // 2], 2)}))
"""


PARTS = {
    "t5_encoder": "t5/text_encoder/model.safetensors",
    "stage_i": "IF-I-XL/unet/diffusion_pytorch_model.safetensors",
    "stage_ii": "IF-II-L/unet/diffusion_pytorch_model.safetensors",
    "x4_unet": "x4/unet/diffusion_pytorch_model.safetensors",
    "x4_vae": "x4/vae/diffusion_pytorch_model.safetensors",
    "x4_text_encoder": "x4/text_encoder/model.safetensors",
}


def count_params(path: Path) -> int:
    """The number of parameters in a safetensors file (from its header)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def build(work: Path, tiny: bool) -> dict[str, int]:
    """Write the three parts' folders under ``work``; their parameter counts."""
    t5, base, sr = (TINY_T5, TINY_I, TINY_II) if tiny else (T5_XXL, IF_I_XL, IF_II_L_STAND_IN)
    params = {"t5_encoder": write_t5(work / "t5", t5)}
    params["stage_i"] = write_pipeline(work / "IF-I-XL", False, base)
    params["stage_ii"] = write_pipeline(work / "IF-II-L", True, sr)
    params.update(write_x4(work / "x4", tiny))
    return params  # the pipelines' T5 is the one in work/t5 (imported with --text-encoder)


def stage_evals(work: Path, model: Path, args: argparse.Namespace) -> dict:
    """Seconds per guided evaluation of each big stage (ours; x4 also diffusers' own), each in a
    fresh process."""
    rows = {}
    unet = json.loads((work / "IF-I-XL" / "unet" / "config.json").read_text())
    width = json.loads((work / "t5" / "text_encoder" / "config.json").read_text())["d_model"]
    shape = (str(unet["sample_size"]), str(width))
    for kind, path in (("ours", model), ("diffusers_bf16", work / "IF-I-XL" / "unet")):
        cmd = [sys.executable, "-c", EVAL, kind.split("_")[0], str(path), str(args.threads)]
        rows[f"eval_stage_i_{kind}"] = run_measured([*cmd, str(args.repeat), *shape], args.timeout)
    latent = json.loads((model / "stage2" / "config.json").read_text())["lowres_size"]
    runs = (
        ("stage_ii_ours", "ours", model, 1, "stored"),
        ("x4_ours_fp32", "ours", model, 2, "fp32"),
        ("x4_diffusers_fp32", "diffusers", work / "x4" / "unet", 2, "fp32"),
    )
    for name, kind, path, k, precision in runs:
        cmd = [sys.executable, "-c", STAGE_EVAL, kind, str(path), str(args.threads)]
        cmd += [str(args.repeat), str(k), precision, str(latent)]
        rows[f"eval_{name}"] = run_measured(cmd, args.timeout)
    return rows


def utilisation(work: Path, rows: dict, args: argparse.Namespace) -> dict:
    """FLOPs per guided evaluation of each big stage (counted on meta) and the fraction of
    this CPU's matmul peak in the dtype it ran in (the peaks measured now, in this run)."""
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    peaks = {"fp32": matmul_peak(cpu, torch.float32), "bf16": matmul_peak(cpu, torch.bfloat16)}
    i_size = json.loads((work / "IF-I-XL" / "unet" / "config.json").read_text())["sample_size"]
    ii_size = json.loads((work / "IF-II-L" / "unet" / "config.json").read_text())["sample_size"]
    latent = json.loads((work / "model" / "stage2" / "config.json").read_text())["lowres_size"]
    t5 = json.loads((work / "t5" / "text_encoder" / "config.json").read_text())["d_model"]
    clip = json.loads((work / "x4" / "text_encoder" / "config.json").read_text())["hidden_size"]
    stages = {
        "stage_i": (eval_flops(work / "IF-I-XL" / "unet", i_size, t5, False), "bf16",
                    "eval_stage_i_ours"),
        "stage_ii": (eval_flops(work / "IF-II-L" / "unet", ii_size, t5, True), "bf16",
                     "eval_stage_ii_ours"),
        "x4": (eval_flops(work / "x4" / "unet", latent, clip, True), "fp32", "eval_x4_ours_fp32"),
    }  # fmt: skip
    out = {"matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()}}
    for name, (flops, dtype, row) in stages.items():
        seconds = rows.get(row, {}).get("s_per_eval")
        out[name] = {"tflop_per_guided_eval": round(flops / 1e12, 2), "dtype": dtype}
        if seconds:
            out[name]["fraction_of_peak"] = round(flops / seconds / peaks[dtype], 3)
    out["vae_decode_tflop"] = round(vae_decode_flops(work / "x4" / "vae", latent) / 1e12, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="folder for the weights (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps per stage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="timed evaluations after a warm-up")
    ap.add_argument("--timeout", type=float, default=2400.0, help="seconds per measurement")
    ap.add_argument("--keep", action="store_true", help="keep the weights afterwards")
    ap.add_argument("--reuse", action="store_true", help="the folders in --work are built")
    ap.add_argument("--tiny", action="store_true", help="tiny widths: checks the script only")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="if_scale-"))
    t0 = time.perf_counter()
    if args.reuse:
        params = {k: count_params(work / p) for k, p in PARTS.items()}
    else:
        params = build(work, args.tiny)
    build_s = time.perf_counter() - t0
    imagen = [sys.executable, "-m", "imagen"]
    model = work / "model"
    shutil.rmtree(model, ignore_errors=True)
    pipes = [str(work / "IF-I-XL"), str(work / "IF-II-L"), str(work / "x4")]
    te = ["--text-encoder", str(work / "t5")]
    rows = {
        "import": run_measured([*imagen, "import", *pipes, *te, "--out", str(model)], args.timeout)
    }
    steps = ",".join([str(args.steps)] * 3)
    sample = [*imagen, "sample", PROMPT, "--model", str(model), "--steps-per-stage", steps]
    shutil.rmtree(work / "out", ignore_errors=True)
    rows["sample_text_to_1024"] = run_measured(
        [*sample, "--threads", str(args.threads), "--out", str(work / "out")], args.timeout
    )
    rows.update(stage_evals(work, model, args))
    ours = rows["eval_stage_i_ours"].get("s_per_eval")
    them = rows["eval_stage_i_diffusers_bf16"]
    theirs = them.get("s_per_eval") or them.get("timed_out_after_s")
    x4_ours = rows["eval_x4_ours_fp32"].get("s_per_eval")
    x4_theirs = rows["eval_x4_diffusers_fp32"].get("s_per_eval")
    result = {
        "tiny": args.tiny,
        "parameters": params,
        "weights_gb_bf16": round(2 * sum(params.values()) / 1e9, 1),
        "build_s": round(build_s, 1),
        "steps_per_stage": args.steps,
        "threads": args.threads,
        "rows": rows,
        "eval_ratio_diffusers_over_ours": round(theirs / ours, 2) if ours and theirs else None,
        "ratio_is_lower_bound": "timed_out_after_s" in them,
        "x4_eval_ratio_diffusers_over_ours_fp32": round(x4_theirs / x4_ours, 2)
        if x4_ours and x4_theirs
        else None,
        "utilisation": utilisation(work, rows, args),
    }
    print(json.dumps(result, indent=2))
    print("wrote", write("if_scale-cpu", result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
