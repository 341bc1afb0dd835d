//! Greedy decoding one step ahead of the host.

use std::collections::VecDeque;

use burn::tensor::{Int, Tensor};

use super::{Engine, EngineBackend, QueuedIds};
use crate::cache::JambaCache;
use crate::error::{JambaError, Result};

/// Greedy decoding one step ahead of the host. Each step runs on the previous step's argmax
/// while it is still on the device, and the ids' copy to the host is queued behind it
/// ([`DeviceOps::queue_read_ids`](super::ops::DeviceOps::queue_read_ids)), so the host issues
/// step `t + 1` before it waits for step `t`'s tokens: the device does not sit idle while the
/// tokens cross to the host and the next step's first launches are issued. Tokens come out in
/// order, one per row each step.
///
/// A caller that stops on a token it has just read (an end-of-sequence id) has already queued
/// one more step: its cache holds one position more than the tokens it kept.
///
/// ```
/// use jamba::backends::Cpu;
/// use jamba::{Engine, GreedyPipeline, Jamba, JambaConfig};
/// let config = JambaConfig::from_json_str(r#"{"hidden_size": 32, "num_hidden_layers": 2,
///     "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 64,
///     "attn_layer_period": 2, "attn_layer_offset": 1, "num_experts": 4}"#).unwrap();
/// let engine = Engine::new(Jamba::<Cpu>::init(&config, &Default::default()), Default::default());
/// let mut cache = engine.new_cache(1);
/// let prefill = engine.forward(&[5, 6, 7], 1, None, &mut cache, Some(1)).unwrap();
/// let mut pipe = GreedyPipeline::new(&engine, prefill).unwrap();
/// pipe.queue_step(&mut cache).unwrap(); // step 1, from the prefill's token still on the device
/// let first = pipe.next_tokens().unwrap(); // the prefill's token
/// let second = pipe.next_tokens().unwrap(); // step 1's
/// assert_eq!((first.len(), second.len(), cache.seq_len()), (1, 1, 4));
/// ```
pub struct GreedyPipeline<'e, B: EngineBackend> {
    engine: &'e Engine<B>,
    /// The newest chosen ids, `[batch, 1]`, on the device.
    newest: Tensor<B, 2, Int>,
    /// Reads of chosen ids in flight, oldest first.
    queued: VecDeque<QueuedIds>,
}

impl<'e, B: EngineBackend> GreedyPipeline<'e, B> {
    /// Starts from a prefill's logits `[batch, seq, vocab]`: the argmax of the last position is
    /// taken on the device and its read queued. Errors on logits without a row, a position or
    /// a vocabulary entry.
    pub fn new(engine: &'e Engine<B>, logits: Tensor<B, 3>) -> Result<Self> {
        let [batch, seq, vocab] = logits.dims();
        if batch == 0 || seq == 0 || vocab == 0 {
            return Err(JambaError::Input(format!(
                "greedy decoding needs logits with a row, a position and a vocabulary; got \
                 [{batch}, {seq}, {vocab}]"
            )));
        }
        let last = logits.slice([0..batch, seq - 1..seq]).reshape([batch, vocab]);
        let newest = B::argmax_rows(last).reshape([batch, 1]);
        let queued = [B::queue_read_ids(newest.clone().reshape([batch]))].into();
        Ok(Self {
            engine,
            newest,
            queued,
        })
    }

    /// Queues one decoding step from the newest chosen ids (not yet read) through `cache`,
    /// takes its argmax on the device and queues that read.
    pub fn queue_step(&mut self, cache: &mut JambaCache<B>) -> Result<()> {
        let batch = self.newest.dims()[0];
        let logits = self.engine.forward_chosen(self.newest.clone(), cache)?;
        let vocab = logits.dims()[2];
        self.newest = B::argmax_rows(logits.reshape([batch, vocab])).reshape([batch, 1]);
        self.queued
            .push_back(B::queue_read_ids(self.newest.clone().reshape([batch])));
        Ok(())
    }

    /// The oldest chosen tokens not yet taken, one per row; waits for their read.
    pub fn next_tokens(&mut self) -> Result<Vec<u32>> {
        let read = self
            .queued
            .pop_front()
            .ok_or_else(|| JambaError::Input("no decoding step is queued".into()))?;
        Ok(read.wait()?.into_iter().map(|t| t as u32).collect())
    }

    /// How many steps' tokens are queued and not yet taken.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }
}
