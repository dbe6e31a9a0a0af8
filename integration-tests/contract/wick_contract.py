"""schemathesis hooks for wick's API contract check (scripts/contract-check.sh).

Every built-in check runs, except that `positive_data_acceptance` is replaced by one that also
takes a 422 as an acceptance when its message names a rule the OpenAPI document states in words
because no JSON schema can (the document's 422 description): token limits that need the
tokenizer, grammars and schemas that must compile, token ids that must be in the vocabulary,
tools a `tool_choice` must name, a chat template's own refusals. Any other 422 for a request
the document accepts is a failure, as is any answer the document does not describe.
"""

import re

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

BEYOND_SCHEMA = re.compile(
    "|".join(
        [
            r"`inputs` must have less than \d+ tokens",
            r"`inputs` tokens \+ `max_new_tokens` must be <= \d+",
            r"grammar is not valid",
            r"is not in the vocabulary",
            r"Tool with name .* not found",
            r"`tool_choice` needs `tools`",
            r"Grammar and tools are mutually exclusive",
            r"^`n` must be >= 1 and <= \d+",
            r"`echo` with `logprobs` is not supported when streaming",
            r"`decoder_input_details` == true is not supported when streaming tokens",
            r"^Template error",
        ]
    )
)


def _message(response):
    try:
        body = response.json()
    except Exception:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    if not isinstance(error, str):
        return ""
    return error.removeprefix("Input validation error: ")


@schemathesis.check
def positive_data_acceptance_beyond_schema(ctx, response, case):
    """`positive_data_acceptance`, with a 422 for a rule no schema can state as an acceptance."""
    if response.status_code == 422 and BEYOND_SCHEMA.search(_message(response)):
        return None
    return positive_data_acceptance(ctx, response, case)
