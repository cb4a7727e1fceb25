"""Image bytes → embedding container in the store.

decode (safe) → content address → existing container? return it : preprocess →
batched vision forward → allocate token IDs → put. Content-addressed, so the
same image for the same tenant and model returns the same container (and IDs)
without touching the model.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import redis
import torch
from PIL import Image

from embedder_service.batcher import Batcher
from shared.config.errors import NotFound, StoreUnavailable, VlmqError
from shared.config.settings import Settings
from shared.media.images import decode_image, image_info
from shared.store.container import EmbeddingContainer, stored_as
from shared.store.containers import ContainerStore, container_id
from shared.store.token_ids import allocate_token_ids

# The warm-up's image: a CLIP tower's input size (towers of dynamic resolution take it as it is).
WARM_UP_IMAGE_SIZE = (224, 224)


class EmbedPipeline:
    def __init__(self, model: torch.nn.Module, store: ContainerStore, client: redis.Redis, settings: Settings,
                 turns: AbstractContextManager = nullcontext()):
        """turns: held around each vision forward (a `shared.modeling.turns.Turns` where another model shares
        the process and its cores)."""
        self.model = model
        self.turns = turns
        self.preprocessor = model.preprocessor
        self.store = store
        self.client = client
        self.settings = settings
        # Decoding and resizing run in these threads while the batcher thread runs the model.
        self.decoders = ThreadPoolExecutor(max_workers=settings.embed_max_batch, thread_name_prefix="vlmq-decode")
        self.batcher: Batcher[Any, torch.Tensor] = Batcher(
            self._forward, settings.embed_max_batch, settings.embed_max_wait_ms / 1000, name="vlmq-embed-batcher"
        )

    def warm_up(self) -> None:
        """One full batch of a plain gray image through the vision tower, nothing stored: a new worker's first
        batch otherwise pays one-off costs (each op's first run, the heap growing to a batch's working set) in its
        first jobs' time. Run by the batcher's thread, whose heap arena and OpenMP team serve the batches after."""
        pixels = self.preprocessor(Image.new("RGB", WARM_UP_IMAGE_SIZE, (128, 128, 128)))
        for future in [self.batcher.submit(pixels) for _ in range(self.batcher.max_batch)]:
            future.result()

    @torch.inference_mode()
    def _forward(self, pixels: list[Any]) -> list[torch.Tensor]:
        # B preprocessed images (what model.preprocessor returns; sizes may differ) → B × [N_i, D] on the CPU, in the model's dtype
        with self.turns:
            return [rows.to("cpu") for rows in self.model.embed_batch(pixels)]

    def embed(self, data: bytes, tenant: str) -> EmbeddingContainer:
        """One image's container; raises InvalidInput/TooLarge for a bad image (nothing else is affected)."""
        image = decode_image(data, max_pixels=self.settings.max_image_pixels)
        cid = container_id(tenant, self.model.fingerprint, self.preprocessor.settings(), data)
        try:
            return self.store.get(cid, tenant=tenant)
        except NotFound:
            pass
        pixels = self.preprocessor(image)
        embeddings = self.batcher.submit(pixels).result()
        num_tokens = embeddings.shape[0]
        now = time.time()
        container = stored_as(EmbeddingContainer(
            id=cid,
            model=self.model.fingerprint,
            tenant=tenant,
            first_token_id=allocate_token_ids(self.client, self.settings.key_prefix, num_tokens),
            num_tokens=num_tokens,
            embeddings=embeddings.contiguous(),
            layout=self.model.layout_for(pixels),
            grid=self.model.grid_for(pixels),
            image=image_info(image, data) | dict(zip(("processed_height", "processed_width"), self.model.processed_size(pixels))),
            alias="",
            created_at=now,
            expires_at=now + self.settings.container_ttl_s,
        ), self.settings.container_dtype)
        return self.store.put(container)

    def embed_many(self, images: list[bytes], tenant: str) -> list[EmbeddingContainer | VlmqError]:
        """Each image's container or the error that names what is wrong with it, in order.

        The same bytes twice in one job are decoded and embedded once (a request of 40 copies of
        one large image costs one decode, not 40).
        """
        futures = {data: self.decoders.submit(self.embed, data, tenant) for data in dict.fromkeys(images)}
        outcomes: list[EmbeddingContainer | VlmqError] = []
        for data in images:
            try:
                outcomes.append(futures[data].result())
            except StoreUnavailable:
                raise  # not the image's fault: the task requeues the job (AttemptLimitedTask)
            except VlmqError as exc:
                outcomes.append(exc)
        return outcomes
