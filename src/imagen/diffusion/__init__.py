"""The diffusion maths: noise schedules, classifier-free guidance and thresholding, samplers. Imports nothing above utils."""
