//! Every metric name the router emits, in one place. Names, types, labels and buckets follow
//! TGI's `tgi_*` metrics so existing dashboards work; `wick_*` names are beyond TGI.

pub const REQUEST_COUNT: &str = "tgi_request_count";
pub const REQUEST_SUCCESS: &str = "tgi_request_success";
/// Label `err`: validation | overloaded | generation | incomplete | dropped | template.
pub const REQUEST_FAILURE: &str = "tgi_request_failure";
pub const REQUEST_DURATION: &str = "tgi_request_duration";
pub const REQUEST_VALIDATION_DURATION: &str = "tgi_request_validation_duration";
pub const REQUEST_QUEUE_DURATION: &str = "tgi_request_queue_duration";
pub const REQUEST_INFERENCE_DURATION: &str = "tgi_request_inference_duration";
pub const REQUEST_MEAN_TIME_PER_TOKEN_DURATION: &str = "tgi_request_mean_time_per_token_duration";
pub const REQUEST_INPUT_LENGTH: &str = "tgi_request_input_length";
pub const REQUEST_MAX_NEW_TOKENS: &str = "tgi_request_max_new_tokens";
pub const REQUEST_GENERATED_TOKENS: &str = "tgi_request_generated_tokens";
/// From a request's arrival to its first generated token (what a streaming client waits).
pub const REQUEST_FIRST_TOKEN_DURATION: &str = "wick_request_first_token_duration";
pub const QUEUE_SIZE: &str = "tgi_queue_size";
pub const BATCH_CURRENT_SIZE: &str = "tgi_batch_current_size";
pub const BATCH_CURRENT_MAX_TOKENS: &str = "tgi_batch_current_max_tokens";
pub const BATCH_MAX_TOTAL_TOKENS: &str = "tgi_batch_max_total_tokens";
pub const BATCH_NEXT_SIZE: &str = "tgi_batch_next_size";
/// Label `reason`: backpressure | wait_exceeded | chunking.
pub const BATCH_CONCAT: &str = "tgi_batch_concat";
/// Label `method`: prefill | decode (also on the four below).
pub const BATCH_INFERENCE_COUNT: &str = "tgi_batch_inference_count";
pub const BATCH_INFERENCE_SUCCESS: &str = "tgi_batch_inference_success";
pub const BATCH_INFERENCE_FAILURE: &str = "tgi_batch_inference_failure";
pub const BATCH_INFERENCE_DURATION: &str = "tgi_batch_inference_duration";
pub const BATCH_FORWARD_DURATION: &str = "tgi_batch_forward_duration";
pub const BATCH_DECODE_DURATION: &str = "tgi_batch_decode_duration";
pub const BATCH_FILTER_DURATION: &str = "tgi_batch_filter_duration";
pub const BATCH_CONCAT_DURATION: &str = "tgi_batch_concat_duration";
/// The parts of the forward pass in the linear layers and in attention (label `method`).
pub const BATCH_FORWARD_LINEAR_DURATION: &str = "wick_batch_forward_linear_duration";
pub const BATCH_FORWARD_ATTENTION_DURATION: &str = "wick_batch_forward_attention_duration";
/// How long the shards waited for a step of a running batch after finishing its previous one:
/// the router's and the transport's share of the step (label `method`).
pub const BATCH_SHARD_IDLE_DURATION: &str = "wick_batch_shard_idle_duration";
/// Steps the shards computed ahead, while the router delivered the previous one (counter).
pub const BATCH_RUN_AHEAD: &str = "wick_batch_run_ahead_total";
/// Prompt tokens served from the prefix cache instead of being computed (counter).
pub const PREFIX_CACHE_HIT_TOKENS: &str = "wick_prefix_cache_hit_tokens_total";
/// Prompt tokens scheduled for prefill in total (counter), to read the hit ratio against.
pub const PREFIX_CACHE_PROMPT_TOKENS: &str = "wick_prefix_cache_prompt_tokens_total";
pub const KV_BLOCKS_FREE: &str = "wick_kv_blocks_free";
pub const KV_BLOCKS_USED: &str = "wick_kv_blocks_used";
/// Concurrency permits held (admitted requests not yet answered or dropped), read at scrape.
pub const REQUESTS_IN_FLIGHT: &str = "wick_requests_in_flight";

/// Registers the help text of every metric (Prometheus `# HELP` lines); call once after the
/// recorder is installed.
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUEST_COUNT, "Generation requests received");
    describe_counter!(REQUEST_SUCCESS, "Generation requests that completed");
    describe_counter!(
        REQUEST_FAILURE,
        "Generation requests that failed, by error type"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "End-to-end request latency"
    );
    describe_histogram!(
        REQUEST_VALIDATION_DURATION,
        Unit::Seconds,
        "Time spent validating and tokenizing a request"
    );
    describe_histogram!(
        REQUEST_QUEUE_DURATION,
        Unit::Seconds,
        "Time a request waited in the queue"
    );
    describe_histogram!(
        REQUEST_INFERENCE_DURATION,
        Unit::Seconds,
        "Time from a request's first batch to its last token"
    );
    describe_histogram!(
        REQUEST_MEAN_TIME_PER_TOKEN_DURATION,
        Unit::Seconds,
        "Mean time per generated token of a request"
    );
    describe_histogram!(
        REQUEST_FIRST_TOKEN_DURATION,
        Unit::Seconds,
        "Time from a request's arrival to its first generated token"
    );
    describe_histogram!(
        REQUEST_INPUT_LENGTH,
        Unit::Count,
        "Prompt tokens per request"
    );
    describe_histogram!(
        REQUEST_MAX_NEW_TOKENS,
        Unit::Count,
        "max_new_tokens per request"
    );
    describe_histogram!(
        REQUEST_GENERATED_TOKENS,
        Unit::Count,
        "Tokens generated per request"
    );
    describe_gauge!(QUEUE_SIZE, Unit::Count, "Requests waiting in the queue");
    describe_gauge!(
        BATCH_CURRENT_SIZE,
        Unit::Count,
        "Requests in the running batch"
    );
    describe_gauge!(
        BATCH_CURRENT_MAX_TOKENS,
        Unit::Count,
        "KV token slots held by the running batch"
    );
    describe_gauge!(
        BATCH_MAX_TOTAL_TOKENS,
        Unit::Count,
        "KV token slots of all shards after warmup"
    );
    describe_histogram!(
        BATCH_NEXT_SIZE,
        Unit::Count,
        "Requests admitted per new batch"
    );
    describe_counter!(
        BATCH_CONCAT,
        "New requests joining a running batch, by reason"
    );
    describe_counter!(
        BATCH_INFERENCE_COUNT,
        "Prefill and decode calls to the shards"
    );
    describe_counter!(
        BATCH_INFERENCE_SUCCESS,
        "Prefill and decode calls that succeeded"
    );
    describe_counter!(
        BATCH_INFERENCE_FAILURE,
        "Prefill and decode calls that failed"
    );
    describe_histogram!(
        BATCH_INFERENCE_DURATION,
        Unit::Seconds,
        "Shard call plus filtering, by method"
    );
    describe_histogram!(
        BATCH_FORWARD_DURATION,
        Unit::Seconds,
        "Shard forward pass time, by method"
    );
    describe_histogram!(
        BATCH_FORWARD_LINEAR_DURATION,
        Unit::Seconds,
        "Part of the shard forward pass in the linear layers, by method"
    );
    describe_histogram!(
        BATCH_FORWARD_ATTENTION_DURATION,
        Unit::Seconds,
        "Part of the shard forward pass in attention (KV cache writes included), by method"
    );
    describe_histogram!(
        BATCH_SHARD_IDLE_DURATION,
        Unit::Seconds,
        "Shard time waiting between steps of a running batch (router and transport), by method"
    );
    describe_counter!(
        BATCH_RUN_AHEAD,
        "Steps the shards started before the router asked for them"
    );
    describe_histogram!(
        BATCH_DECODE_DURATION,
        Unit::Seconds,
        "Shard sampling and detokenization time, by method"
    );
    describe_histogram!(
        BATCH_FILTER_DURATION,
        Unit::Seconds,
        "Router time sending tokens and filtering, by method"
    );
    describe_histogram!(
        BATCH_CONCAT_DURATION,
        Unit::Seconds,
        "Shard time merging batches, by method"
    );
    describe_counter!(
        PREFIX_CACHE_HIT_TOKENS,
        "Prompt tokens served from the prefix cache"
    );
    describe_counter!(
        PREFIX_CACHE_PROMPT_TOKENS,
        "Prompt tokens scheduled for prefill"
    );
    describe_gauge!(KV_BLOCKS_FREE, Unit::Count, "KV cache blocks free");
    describe_gauge!(KV_BLOCKS_USED, Unit::Count, "KV cache blocks in use");
    describe_gauge!(
        REQUESTS_IN_FLIGHT,
        Unit::Count,
        "Requests holding a concurrency permit (admitted, not yet answered or dropped)"
    );
}
