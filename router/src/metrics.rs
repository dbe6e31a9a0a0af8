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
/// Prompt tokens served from the prefix cache instead of being computed (counter).
pub const PREFIX_CACHE_HIT_TOKENS: &str = "wick_prefix_cache_hit_tokens";
/// Prompt tokens scheduled for prefill in total (counter), to read the hit ratio against.
pub const PREFIX_CACHE_PROMPT_TOKENS: &str = "wick_prefix_cache_prompt_tokens";
pub const KV_BLOCKS_FREE: &str = "wick_kv_blocks_free";
pub const KV_BLOCKS_USED: &str = "wick_kv_blocks_used";
