"""Names shared by every stage."""

# CheXpert's 14 observations, exactly as CXR-MAX and the labeler name them.
OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# The seven CXR-MAX teachers (the paper's dataset, arXiv 2510.04142), as the synthetic benchmark names them.
TEACHERS = (
    "GPT-5-nano",
    "Gemini-2.5-flash-lite",
    "Claude-Sonnet-4",
    "Grok-4",
    "Qwen-VL-Max",
    "GLM-4.5V",
    "Moonshot-v1",
)

# MS-CXR-T temporal classification: findings and classes (official CSV columns are `<finding>_progression`).
MSCXRT_FINDINGS = ("consolidation", "edema", "pleural_effusion", "pneumonia", "pneumothorax")
MSCXRT_CLASSES = ("improving", "stable", "worsening")
