"""The random streams of a training run: one for host decisions, one on the training device.

Tensors a step needs (cameras, ray jitter, SDS timesteps and noise, background colours) are drawn
on the training device from `device`, so nothing random is made on the CPU and copied over; choices
taken in Python (which shading, whether to replace the background) come from `host`, a CPU
generator, so they cost no host<->device synchronisation. Both states go into every checkpoint,
with the CUDA default generators, so a resumed run draws the numbers it would have drawn
(docs/gpu.md, "Synchronisations and random numbers").
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class RandomStreams:
    host: torch.Generator
    device: torch.Generator

    @classmethod
    def seeded(cls, seed: int, device: torch.device | str = "cpu") -> "RandomStreams":
        """Two independent streams from one seed (the device stream is seeded with seed + 1)."""
        device = torch.device(device)
        return cls(torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed + 1))

    def state_dict(self) -> dict:
        """Generator states, plus the CUDA default generators' when CUDA is in use (nerfacc's
        occupancy-grid updates and cuDNN draw from those)."""
        state = dict(host=self.host.get_state(), device=self.device.get_state(), device_type=self.device.device.type,
                     torch_cpu=torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["torch_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.host.set_state(state["host"])
        saved_type = state.get("device_type") or ("cpu" if state["device"].numel() == self._cpu_state_size() else "cuda")
        if saved_type == self.device.device.type:
            self.device.set_state(state["device"])
        else:  # resumed on another device: a CUDA (Philox) state cannot seed a CPU generator, nor the reverse
            seed = int.from_bytes(hashlib.sha256(state["device"].numpy().tobytes()).digest()[:8], "little") >> 1
            self.device.manual_seed(seed)
            log.warning("the checkpoint's device random stream is from %s; on %s it restarts from a seed derived from it "
                        "(the run goes on, but not with the numbers it would have drawn on %s)",
                        saved_type, self.device.device.type, saved_type)
        torch.set_rng_state(state["torch_cpu"])
        cuda_states = state.get("torch_cuda")
        if cuda_states is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])

    @staticmethod
    def _cpu_state_size() -> int:
        return torch.Generator().get_state().numel()
