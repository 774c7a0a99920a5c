"""Small helpers every layer may use: safetensors I/O and int8 weights, image grids and conversions, hardware description."""
