"""LightningModules: one per registration method (see :mod:`systems.base` for the interface)."""

from systems.base import BenchmarkSystem, DivergenceError, NoRegistration, RegistrationSystem
from systems.ants_reference import ANTsPyReference
from systems.syn import SyN
from systems.voxelmorph import VoxelMorph
from systems.msff import MSFF
from systems.diffop import DiffOpNet
from systems.patchmorph import PatchMorph
from systems.pose_base import InitialPose, PoseSystem
from systems.pose_baseline import CMAESPose, GradientPose
from systems.cdreg import CDReg

__all__ = ["BenchmarkSystem", "RegistrationSystem", "NoRegistration", "DivergenceError", "VoxelMorph", "SyN", "ANTsPyReference", "MSFF", "DiffOpNet", "PatchMorph",
           "PoseSystem", "InitialPose", "CMAESPose", "GradientPose", "CDReg"]
