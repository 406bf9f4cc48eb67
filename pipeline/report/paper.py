"""The published numbers the report prints beside its own, and which of them fit the model evaluated.

STM's Table 5 comes from a model trained with YouTube-VOS; a model trained without it is shown
beside STM Table 3's DAVIS-only figure instead. STRMN's figures are its static images + DAVIS ones.
"""

from __future__ import annotations

from pipeline.report.rows import Row

# Published numbers on DAVIS-2017 val (ResNet-50), each with the training data behind it:
# - STM Table 5 (J Mean, s/frame on DAVIS-2016): the model trained with YouTube-VOS (+YV);
# - STM Table 3 "Ours" (J Mean): the model trained on DAVIS only (Every 5 frames, the final model);
# - STRMN Table 4 (J, F, mean): pre-trained on static images, fine-tuned on DAVIS-2017 only.
PAPER_STM = {"first": (67.0, 0.06), "previous": (69.6, 0.06), "first+previous": (77.7, 0.07), "every:5": (79.2, 0.16)}

PAPER_STM_DAVIS_ONLY = {"every:5": 69.2}

PAPER_STRMN = {"A": (74.5, 80.1, 77.3), "B": (73.0, 78.5, 75.7), "C": (76.1, 81.0, 78.5), "D": (74.9, 80.1, 77.5)}

PAPER_STRMN_I2M = (69.2, 74.7, 72.0)  # STRMN Table 3, same training data as Table 4

STM_WITH_YOUTUBE = "Paper: J / time (DAVIS-17; STM Table 5, trained with YouTube-VOS)"

STM_DAVIS_ONLY = "Paper: J (DAVIS-17; STM Table 3, trained on DAVIS only)"

STRMN_PAPER = "Paper: J / F / Mean (DAVIS-17; STRMN Table 4, static images + DAVIS only)"



def trained_with_youtube(training_data: str) -> bool:
    return "youtube" in training_data.lower()



def stm_paper_column(rows: list[Row]) -> str:
    """The published column that fits the STM model evaluated: Table 5 needs YouTube-VOS training."""
    data = [r.training_data for r in rows if r.model == "stm"]
    return STM_WITH_YOUTUBE if data and all(trained_with_youtube(d) for d in data) else STM_DAVIS_ONLY



def training_note(rows: list[Row]) -> str:
    """One sentence per model kind: what it was trained on, and which published figure fits it."""
    notes = []
    for kind, name in (("stm", "STM"), ("strmn", "STRMN")):
        data = sorted({r.training_data for r in rows if r.model == kind and r.training_data})
        if data:
            notes.append(f"The {name} model evaluated here was trained on: {'; '.join(data)}.")
    if any(r.model == "stm" for r in rows):
        if stm_paper_column(rows) == STM_WITH_YOUTUBE:
            notes.append("Its paper column is STM Table 5, whose numbers come from the model trained with "
                         "YouTube-VOS (+YV): the same training data, so the columns compare directly.")
        else:
            notes.append("STM Table 5's numbers come from the model trained with YouTube-VOS (+YV), which this "
                         "model was not, so the paper column shows the published DAVIS-only figure instead "
                         "(STM Table 3, every 5 frames: J 69.2, F 74.0); Table 5 (+YV): 67.0 / 69.6 / 77.7 / 79.2 J.")
    return " ".join(notes)

