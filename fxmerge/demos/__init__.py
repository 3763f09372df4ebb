"""The main jobs: end-to-end compressions on data that ships with scikit-learn.

`classify` (the default): a MobileNetV2-style classifier, scored by accuracy.
`ddpm`: a diffusion U-Net, scored by held-out loss and a Frechet distance of samples.
"""
