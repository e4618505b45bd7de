"""Evaluation: the CheXpert-style labeler, NLG and clinical metrics, report generation (report), MS-CXR-T (mscxrt),
teacher drift (drift) and the paper's tables (tables)."""
