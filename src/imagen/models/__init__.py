"""The networks: the text-conditioned U-Net, a stage (U-Net + schedule + conditioning + loss), the cascade and its model directories, presets."""
