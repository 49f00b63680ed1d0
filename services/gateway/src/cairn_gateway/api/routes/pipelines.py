"""`/v1/pipelines`: the pipeline catalog the workers announced (read scope).

Each entry says what a job may name: the pipeline, its version, its params as JSON Schema (what
`POST /v1/jobs` checks `params` against) and its work space (what sharding splits).
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from cairn_contracts.jobs import PIPELINE_NAME
from cairn_contracts.pipelines import CatalogEntry
from cairn_gateway.api.deps import Caller
from cairn_gateway.catalog import PipelineCatalog
from cairn_gateway.errors import NotFound
from cairn_gateway.problems import Problem

router = APIRouter(prefix="/v1/pipelines", tags=["pipelines"])


def pipeline_catalog(request: Request) -> PipelineCatalog:
    return request.app.state.pipelines


Catalog = Annotated[PipelineCatalog, Depends(pipeline_catalog)]


class PipelineView(BaseModel):
    name: str
    version: str
    description: str
    params_schema: dict[str, Any] = Field(description="JSON Schema of the job's `params`")
    space: list[dict[str, Any]] = Field(description="Work-space descriptors, in order: the first whose fields are set applies")
    announced_at_ms: int = Field(description="When a worker last announced it (epoch ms)")
    announced_by: str = Field(description="The worker that did")


class PipelineList(BaseModel):
    items: list[PipelineView]


class PipelineNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"no pipeline {name} is announced", name)


def _view(entry: CatalogEntry) -> PipelineView:
    return PipelineView.model_validate(entry.model_dump())


@router.get("", response_model=PipelineList)
async def list_pipelines(catalog: Catalog, _: Caller) -> PipelineList:
    """Every pipeline a worker announced, by name."""
    return PipelineList(items=[_view(entry) for entry in await catalog.list()])


@router.get("/{name}", response_model=PipelineView, responses={404: {"model": Problem, "description": "No such pipeline announced"}})
async def get_pipeline(name: Annotated[str, Path(pattern=PIPELINE_NAME)], catalog: Catalog, _: Caller) -> PipelineView:
    """One announced pipeline."""
    entry = await catalog.get(name)
    if entry is None:
        raise PipelineNotFound(name)
    return _view(entry)
