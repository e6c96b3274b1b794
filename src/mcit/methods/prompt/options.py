"""The prompt pool's options (shared by prompt_pool, fwd_prompt and modalprompt)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mcit.methods.base import MethodOptions


class PromptPoolOptions(MethodOptions):
    pool_size: int = Field(10, ge=1, description="entries in the pool")
    length: int = Field(4, ge=1, description="prompt tokens per entry")
    top_k: int = Field(2, ge=1, description="entries selected per sample")
    key_weight: float = Field(0.5, ge=0, description="weight of the key-matching loss (1 - cos)")
    init_std: float | None = Field(None, gt=0, description="prompt init std (default: the token embeddings' std)")
    diversity: bool = Field(True, description="L2P's diversified selection while training: each entry's match "
                                              "distance times its share of earlier tasks' selections")
    batchwise: bool = Field(True, description="L2P's batch-wise selection while training: the whole batch takes "
                                              "the top_k entries its samples selected most, so a task trains the "
                                              "entries its queries select together at test time")
    keys: int = Field(1, ge=1, description="keys per entry and modality; an entry scores by its best-matching key")
    key_fit: Literal["loss", "exact"] = Field(
        "loss", description="loss: the key-matching loss trains the selected keys by gradient (L2P); exact: as loss "
        "while a task trains, then the keys of the top_k entries it selected most (unless an earlier task keyed "
        "them) are set to minimise that loss over its queries exactly (spherical k-means, as eproj's key phase)"
    )
    key_samples: int = Field(500, ge=1, description="training samples of a task whose queries an exact key fit uses")
    depth: int = Field(1, ge=1, description="language-model layers whose input carries the prompts: 1 = the input "
                                            "embeddings only; n > 1 also gives each of the first n-1 decoder layers "
                                            "after the embeddings prompts of their own (deep prompts)")

    @model_validator(mode="after")
    def _k(self):
        if self.top_k > self.pool_size:
            raise ValueError(f"top_k ({self.top_k}) must not exceed pool_size ({self.pool_size})")
        return self
