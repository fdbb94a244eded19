"""Vim blocks, 3D patch embedding, report encoder, CMViM and its classifier."""
from .cmvim import CMViM, CMViMClassifier, Decoder, ImageEncoder, PretrainOutput
from ..model_config import MODALITIES, PRESETS, LossConfig, ModelConfig, ReportConfig, model_config
from .patch import PatchEmbed3D, patchify, random_masking, sincos_pos_embed_3d, unpatchify
from .report import BytesVimReportEncoder
from .vim import BiMamba, Block, VimEncoder

__all__ = ["CMViM", "CMViMClassifier", "Decoder", "ImageEncoder", "PretrainOutput", "MODALITIES", "PRESETS",
           "LossConfig", "ModelConfig", "ReportConfig", "model_config", "PatchEmbed3D", "patchify",
           "random_masking", "sincos_pos_embed_3d", "unpatchify", "BytesVimReportEncoder",
           "BiMamba", "Block", "VimEncoder"]
