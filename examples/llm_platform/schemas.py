"""The JSON bodies the web app accepts; bounds match the columns, so no input reaches the
database that it would refuse with an error (a 500) instead of a 422."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

Name = Annotated[str, Field(min_length=1, max_length=255)]
Id = Annotated[str, Field(min_length=1, max_length=36)]


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


class ModelConfig(BaseModel):
    provider: Name
    model_id: Name
    agent_mode: dict[str, Any] = {}
    dataset_configs: dict[str, Any] = {}


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
