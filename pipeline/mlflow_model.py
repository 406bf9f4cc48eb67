"""The MLflow model of a trained network, logged from code (no pickle): MLflow stores this file and
the weights-only checkpoint; loading runs this file and reads the checkpoint with weights_only=True.

Input: {"frames": T x H x W x 3 uint8, "mask": H x W uint8 first-frame object ids (0 = background)}.
Output: T x H x W uint8 object ids, frame 0 being the given mask.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from mlflow.pyfunc import PythonModel  # `mlflow.pyfunc` is a lazy loader to the type checker


class SegmentationModel(PythonModel):
    """`InferenceCore` around the checkpoint in artifact `checkpoint`, memory policy `every:5`."""

    def load_context(self, context) -> None:
        from stm_core.model.checkpoint import load_checkpoint

        self.network = load_checkpoint(context.artifacts["checkpoint"]).eval()  # weights_only=True inside

    # No type hints on the arguments: MLflow would derive a second, looser signature from them.
    def predict(self, context, model_input, params=None):  # -> T x H x W uint8
        import torch

        from stm_core.inference import InferenceCore, probabilities_to_mask

        frames = np.asarray(model_input["frames"], dtype=np.uint8)  # T x H x W x 3
        first = torch.from_numpy(np.asarray(model_input["mask"]).astype(np.int64))  # H x W
        if frames.ndim != 4 or frames.shape[-1] != 3 or tuple(first.shape) != frames.shape[1:3]:
            raise ValueError(f"frames must be T x H x W x 3 and mask H x W, got {frames.shape} and {tuple(first.shape)}")
        core = InferenceCore(self.network, memory=(params or {}).get("memory", "every:5"))
        out = np.zeros(frames.shape[:3], dtype=np.uint8)
        try:
            with torch.inference_mode():
                for t, frame in enumerate(frames):
                    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)  # 3 x H x W uint8
                    probs = core.step(image, first if t == 0 else None)
                    out[t] = probabilities_to_mask(probs, core.object_ids).numpy().astype(np.uint8)
        finally:
            core.close()
        return out


mlflow.models.set_model(SegmentationModel())
