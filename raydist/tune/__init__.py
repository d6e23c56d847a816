"""Ray Tune + Optuna sweeps over job keys (FGSM-SDI interval k, learning rates, activations, ...)."""
