"""`/v1/containers/{id}`: a container's metadata, its tensor as safetensors, deletion."""

from __future__ import annotations

from fastapi import APIRouter, Response
from safetensors.torch import save

from embedder_service.api.schemas import ContainerInfo
from shared.config.errors import NotFound
from shared.web.app import Tenant
from shared.web.deps import StoreDep

router = APIRouter(prefix="/v1", tags=["containers"])


@router.get("/containers/{container_id}", response_model=ContainerInfo)
def get_container(container_id: str, tenant: Tenant, store: StoreDep) -> dict:
    return store.get(container_id, tenant=tenant).metadata()


@router.get(
    "/containers/{container_id}/tensor",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}},
                     "description": "safetensors file with tensor `embeddings` (and `scales`, one per row, for an int8 container)"}},
)
def get_container_tensor(container_id: str, tenant: Tenant, store: StoreDep) -> Response:
    container = store.get(container_id, tenant=tenant)
    # The decoded tensors may be read-only views of the Redis reply; safetensors needs its own copies.
    tensors = {"embeddings": container.embeddings.clone()}
    if container.scales is not None:
        tensors["scales"] = container.scales.clone()
    data = save(tensors, metadata={"container_id": container.id, "model": container.model})
    return Response(data, media_type="application/octet-stream", headers={"Content-Disposition": f'attachment; filename="{container.id}.safetensors"'})


@router.delete("/containers/{container_id}", status_code=204)
def delete_container(container_id: str, tenant: Tenant, store: StoreDep) -> Response:
    if not store.delete(container_id, tenant=tenant):
        raise NotFound(f"container {container_id} not found")
    return Response(status_code=204)
