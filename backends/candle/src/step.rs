//! What one forward step computes: the packed batch's tokens and each sequence's part of it,
//! the input of [`crate::model`] and of [`crate::attention`].

/// One forward step over a packed batch: every token of every sequence, concatenated.
pub struct StepInput<'a> {
    /// Token ids, `[total_tokens]`.
    pub tokens: Vec<u32>,
    /// Absolute position of each token in its sequence (its K/V goes to the slot its
    /// sequence's block table gives that position: [`SeqSpan::slot`]).
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqSpan<'a>>,
    /// Packed token indices whose logits are wanted, in output row order.
    pub logit_rows: Vec<u32>,
}

/// One sequence's part of a packed step.
pub struct SeqSpan<'a> {
    /// Offset of its first token in the packed arrays.
    pub start: usize,
    /// Tokens it computes this step.
    pub len: usize,
    /// Tokens in its KV after this step (cached + this step's).
    pub context_len: usize,
    /// Its KV blocks, in order: position `p` lives in block `block_table[p / block_size]`.
    pub block_table: &'a [u32],
    /// Its tokens are prompt tokens (else one generated token). Prompt positions always take
    /// the chunk attention kernel and generated ones the decode kernel, whatever the step's
    /// size, so a position's result does not depend on how its prompt was split into chunks
    /// or how much of it the prefix cache held.
    pub prompt: bool,
}

impl SeqSpan<'_> {
    /// Where `position` sits in the KV cache: its block (`block_table[p / block_size]`) and
    /// its index in that block (`p % block_size`).
    pub fn kv_place(&self, position: usize, block_size: usize) -> (usize, usize) {
        (
            self.block_table[position / block_size] as usize,
            position % block_size,
        )
    }
}
