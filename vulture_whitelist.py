"""Names vulture (`make lint`, 60% confidence) cannot see used, each with the reason it is used.

vulture reads this file as code that uses the names below; it is never imported."""

# ruff: noqa
from unbroken.api import app, chat, compact, demo, models, operator, responses
from unbroken.api.http1 import _HeadWithFirstChunk
from unbroken.api.identity import LambdaContextInfo
from unbroken.api.streaming import OpeningSSE
from unbroken.journal.store import StoreStats
from unbroken.journal.writer import JournalWriter

# FastAPI calls route functions and exception handlers it was given by decorator.
app._invalid
app.healthz
chat.create_chat_completion
compact.compact_response
demo.demo_page
demo.demo_script
demo.kill_producer
models.list_models
operator.deployment_health
responses.get_response

# pydantic reads `model_config` and calls `field_validator` / `model_validator` methods; body fields the router
# accepts but does not act on (`phase`, `include`) are part of the spec's request shape.
_.model_config
_._shorthand_messages
_._input_size
_._metadata_size
_._known_provider
_._unique_deployments
_._one_form
_._unique_models
_._origins
_._no_credentials_for_everyone
_._one_key_source
_.phase
_.include
# Deployment options: validators pydantic calls; the simulated provider reads its fields through model_dump().
_._output_format_known
_._keys_of_the_api
_._bytes_only
_._provider_options
_._needs_base_url
_.ttft_ms
_.tps

# Provider classes are loaded by name from providers.PROVIDERS ("module:Class").
_.AnthropicProvider
_.AzureOpenAIProvider
_.BedrockProvider
_.GeminiProvider
_.OpenAICompatibleProvider
_.SimulatedProvider

# Entry points named in template.yaml / functions/: uvicorn loads `unbroken.app:lambda_app`, the worker handler
# calls `handle_event`.
_.lambda_app
_.handle_event

# Read by benchmarks and tests: what a store wrote (StoreStats), the writer's committed position, the simulator's
# connection count and its thread helper, the Lambda context's fields (parsed from the adapter's header; tests/sam).
StoreStats.commits
StoreStats.items_written
StoreStats.bytes_written
StoreStats.wru
JournalWriter.committed_seq
_.connections_accepted
_.start_in_thread
LambdaContextInfo.function_arn
LambdaContextInfo.xray_trace_id

# logging.Formatter reads `converter` to make timestamps.
_.converter

# The Python client's public functions: called by users of `unbroken.client` (and its tests), not by the router.
_.stream_events
_.async_stream_events
# The store's counters and records: the Store interface (every backend implements it, the contract suite calls it).
_.add_counters
_.get_counters
_.put_record
_.list_records
_.delete_record
# Routing config and the price catalog: validators pydantic calls; capabilities read by name (`ModelCapabilities.lacks`
# uses getattr with the request's needs; catalog capabilities reach deployments through model_dump()); `as_of` and
# `verified` are the catalog's provenance, for people reading it and checked by tests/unit/test_catalog.py.
_._from_catalog
_._not_both_zero
_._shares
_.images
_.assistant_prefill
_.as_of
_.verified
# The older ranking entry point (routing/policy.rank), still called by tests/unit/test_health.py; the router ranks
# with routing/policy.plan. Remove both together.
_.rank

# The admin API's routes (api/admin.py): FastAPI calls them.
from unbroken.api import admin
admin.get_key
admin.revoke_key
admin.get_tenant
admin.read_spend
# The admin function's entry point (functions/admin/handler.py) builds its app with it.
from unbroken import app
app.admin_app_from_env
# The tenant alone of a YAML key (auth uses `key_for`, which gives the key's id too); kept for callers and tests.
from unbroken.config import Config
Config.tenant_for_key

# Call counts the benchmarks and tests read (CounterBatcher.flushes, CounterReader.reads, the key cache's reads).
_.flushes
_.reads

# Starlette's StreamingResponse.stream_response reads the body an OpeningSSE sets once it is opened.
OpeningSSE.body_iterator

# asyncio.Transport's interface: uvicorn calls write() only, but a writelines() that reached the socket transport
# (through __getattr__) would overtake a held head.
_HeadWithFirstChunk.writelines
