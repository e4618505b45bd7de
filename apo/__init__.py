"""Autonomous Preference Optimization (APO): learn -> compare -> critique.

One module per stage of the paper (arXiv 2510.04142):
  data        canonical case record and loaders (CXR-MAX layouts, ms-swift rows, MIMIC-CXR-JPG paths)
  sft         stage 1 data for ms-swift (`apo prepare-sft`)
  consensus   stage 2, the in-context consensus trajectory t+ (`apo consensus`)
  pairs       preference groups {t+, teachers} and the pairwise DPO export (`apo build-pairs`)
  loss        the Plackett-Luce APO loss (and DPO for the ablation)
  trainer     APOTrainer (`apo train`)
  labeler, metrics, evaluate, drift, tables   evaluation
"""

__version__ = "0.1.0"
