"""The JSON bodies the web app accepts; bounds match the columns, so no input reaches the
database that it would refuse with an error (a 500) instead of a 422."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .models import ID_LENGTH

Name = Annotated[str, Field(min_length=1, max_length=255)]
Id = Annotated[str, Field(min_length=1, max_length=ID_LENGTH)]
DatasetId = Annotated[str, Field(min_length=1, max_length=ID_LENGTH, pattern=r"^\S+$")]


class NewTenant(BaseModel):
    name: Name


class NewAccount(BaseModel):
    name: Name
    email: Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=255)]
    interface_language: Annotated[str, Field(min_length=2, max_length=16)] = "en-US"


class NewApp(BaseModel):
    tenant_id: Id
    account_id: Id
    name: Name
    mode: Literal["chat", "completion", "agent-chat", "advanced-chat", "workflow"]
    icon: Annotated[str, Field(max_length=255)] = "🤖"
    description: str = ""


class _Open(BaseModel):
    """A part of the original's model config: the keys the example reads are checked, the
    others are kept as they were sent."""

    model_config = ConfigDict(extra="allow")


class DatasetRef(_Open):
    id: DatasetId
    enabled: bool = True


class Entry(_Open):
    """A tool of the agent, or an entry of the dataset configs: ``{"dataset": {"id": ...}}``
    names a dataset to join; entries of other kinds are kept and not read."""

    dataset: DatasetRef | None = None

    @field_validator("dataset", mode="before")
    @classmethod
    def _present_means_an_object(cls, value: object) -> object:
        if value is None:  # only an absent dataset may be None: a null one names nothing
            raise ValueError("a dataset entry needs an object with an id")
        return value


class AgentMode(_Open):
    tools: list[Entry] = []


class DatasetList(_Open):
    datasets: list[Entry] = []


class DatasetConfigs(_Open):
    datasets: DatasetList = Field(default_factory=DatasetList)


class ModelConfig(BaseModel):
    """The model config; the service saves exactly what was sent (``model_dump`` with
    ``exclude_unset``), once its dataset ids are known to be well formed."""

    provider: Name
    model_id: Name
    agent_mode: AgentMode = Field(default_factory=AgentMode)
    dataset_configs: DatasetConfigs = Field(default_factory=DatasetConfigs)


class DraftWorkflow(BaseModel):
    graph: dict[str, Any]


class NewDataset(BaseModel):
    tenant_id: Id
    account_id: Id
    name: Name
    indexing_technique: Literal["high_quality", "economy"] = "economy"
    doc_form: Literal["text_model", "qa_model", "hierarchical_model"] = "text_model"


class NewFile(BaseModel):
    tenant_id: Id
    name: Name
    content: str


class NewDocuments(BaseModel):
    file_ids: Annotated[list[Id], Field(min_length=1, max_length=100)]


class NewMessage(BaseModel):
    account_id: Id
    query: Annotated[str, Field(min_length=1)]
    conversation_id: Id | None = None
