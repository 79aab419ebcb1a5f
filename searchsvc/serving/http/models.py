"""Request and response bodies of the HTTP API.

A search answer is :class:`~searchsvc.serving.search.QueryResponse` itself (a dataclass
pydantic reads): the same definition ``searchsvc query --json`` prints.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from searchsvc.serving.search import QueryResponse

MAX_PRODUCT_IMAGES = 32
MAX_IMAGE_URL_CHARS = 2048


class ErrorItem(BaseModel):
    field: str | None = Field(description="Which input was wrong (e.g. query.top_k, image).")
    reason: str


class ErrorBody(BaseModel):
    errors: list[ErrorItem]


class SearchJson(BaseModel):
    """Exactly one of ``image_b64`` or ``image_url``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["image_b64"], "not": {"required": ["image_url"]}},
                {"required": ["image_url"], "not": {"required": ["image_b64"]}},
            ]
        },
    )
    # Constraints checked by the validators below, declared in the schema by hand: on the
    # Optional itself pydantic would apply them to None, and on its str arm name the arm
    # ("image_url.constrained-str") in errors.
    image_b64: str | SkipJsonSchema[None] = Field(
        default=None,
        description="The photo's file bytes, base64.",
        json_schema_extra={"minLength": 1},
    )
    image_url: str | SkipJsonSchema[None] = Field(
        default=None,
        description="An http(s) URL the server fetches the photo from: off unless "
        "SEARCHSVC_API_IMAGE_URL_HOSTS names its host (redirects checked again, "
        "SEARCHSVC_MAX_IMAGE_BYTES and SEARCHSVC_API_IMAGE_URL_TIMEOUT_S apply).",
        json_schema_extra={"minLength": 1, "maxLength": MAX_IMAGE_URL_CHARS},
    )

    @field_validator("image_b64", "image_url")
    @classmethod
    def not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("image_url")
    @classmethod
    def not_too_long(cls, value: str | None) -> str | None:
        if value is not None and len(value) > MAX_IMAGE_URL_CHARS:
            raise ValueError(f"at most {MAX_IMAGE_URL_CHARS} characters")
        return value

    @model_validator(mode="after")
    def exactly_one_photo(self) -> SearchJson:
        if (self.image_b64 is None) == (self.image_url is None):
            raise ValueError("give exactly one of image_b64 or image_url")
        return self


class BatchJson(BaseModel):
    """Photos by value only: a batch fetches no ``image_url``."""

    model_config = ConfigDict(extra="forbid")
    images_b64: list[str] = Field(min_length=1, description="Photos' file bytes, base64 each.")


class BatchItem(BaseModel):
    index: int
    response: QueryResponse | None = None
    error: ErrorItem | None = None


class BatchResponse(BaseModel):
    items: list[BatchItem]
    rerank_note: str = Field(
        description="How the photos' reranks were run (concurrently, sharing STIR forwards "
        "through the reranker's batcher where they meet)."
    )


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query_id: str = Field(min_length=1, max_length=64)
    product_id: str = Field(min_length=1, max_length=255)
    positive: bool = True


class FeedbackOut(BaseModel):
    feedback_id: int
    query_id: str
    product_id: str
    positive: bool


class ProductImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data_b64: str = Field(min_length=1, description="The image file's bytes, base64.")
    name: str | None = Field(default=None, max_length=255, description="For messages only.")


class ProductIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(default=None, max_length=1000)
    category: str | None = Field(default=None, max_length=255)
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    url: str | None = Field(default=None, max_length=2000)
    attributes: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    images: list[ProductImageIn] = Field(min_length=1, max_length=MAX_PRODUCT_IMAGES)


class ProductImageOut(BaseModel):
    image_id: int
    filename: str
    content_hash: str
    status: str
    error: str | None


class Problem(BaseModel):
    item: str
    reason: str


class ProductOut(BaseModel):
    product_id: str
    title: str | None
    category: str | None
    price: float | None
    url: str | None
    attributes: dict[str, Any]
    images: list[ProductImageOut]


class ProductUpdateOut(BaseModel):
    product: ProductOut
    images_embedded: int
    images_unchanged: int
    images_removed: int
    problems: list[Problem] = Field(description="Images that were not taken, and why.")


class ProductDeleteOut(BaseModel):
    product_id: str
    images_removed: int


class IngestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    catalog: str = Field(min_length=1, description="A catalog folder on the server's machine.")
    sync: bool = False
    max_delete: str | None = Field(
        default=None,
        max_length=32,
        description="With sync: at most N images (25) or this share (0.3, 30%) removed.",
    )
    force: bool = Field(default=False, description="With sync: no limit on what it removes.")


class SwitchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version_id: int = Field(ge=1, le=2**63 - 1)


class Readiness(BaseModel):
    ready: bool
    missing: list[str] = Field(description="What is not ready yet, and why.")
