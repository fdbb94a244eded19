"""cmvim: federated CMViM pretraining and fine-tuning for 3D multi-modal brain imaging."""
__version__ = "0.1.0"
