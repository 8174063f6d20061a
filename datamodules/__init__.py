"""LightningDataModules of image pairs (batches follow :mod:`datamodules.batch`)."""

from datamodules.base import CheckLine, PairDataModule, RegistrationData, RegistrationDataModule, UnpaddedDistributedSampler
from datamodules.batch import collate_pairs, validate_batch
from datamodules.synthetic import SyntheticBrainGenerator
from datamodules.synthetic_brain import SyntheticBrainDataModule
from datamodules.anatomy_brain import AnatomyBrainDataModule, AnatomyBrainGenerator
from datamodules.nifti_pairs import NiftiPairsDataModule
from datamodules.mindboggle import MindBoggle101DataModule
from datamodules.lumir import LUMIRDataModule
from datamodules.spine import SpineDRRDataModule

__all__ = [
    "RegistrationData",
    "RegistrationDataModule",
    "CheckLine",
    "PairDataModule",
    "UnpaddedDistributedSampler",
    "collate_pairs",
    "validate_batch",
    "SyntheticBrainGenerator",
    "SyntheticBrainDataModule",
    "AnatomyBrainDataModule",
    "AnatomyBrainGenerator",
    "NiftiPairsDataModule",
    "MindBoggle101DataModule",
    "LUMIRDataModule",
    "SpineDRRDataModule",
]
