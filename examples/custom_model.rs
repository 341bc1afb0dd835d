//! Jamba inside one's own Burn code: a sequence classifier made of a Jamba backbone and a
//! linear head on its mean-pooled last hidden state, as an ordinary Burn module, trained for a
//! few steps with Burn's autodiff and AdamW.
//!
//! ```sh
//! cargo run --release --example custom_model
//! ```

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use jamba::backends::Cpu;
use jamba::{ForwardOptions, Jamba, JambaBackend, JambaConfig};

/// A Jamba backbone with a classification head.
#[derive(Module, Debug)]
struct Classifier<B: Backend> {
    backbone: Jamba<B>,
    head: Linear<B>,
}

impl<B: JambaBackend> Classifier<B> {
    /// Class logits `[batch, classes]` for token ids `[batch, seq]`.
    fn forward(&self, ids: Tensor<B, 2, Int>) -> jamba::Result<Tensor<B, 2>> {
        let options = ForwardOptions {
            output_hidden_states: true,
            logits_to_keep: Some(1),
            ..Default::default()
        };
        let out = self.backbone.forward(ids, None, None, &options)?;
        let last = out.hidden_states.last().expect("a hidden state per layer").clone();
        let [batch, _, hidden] = last.dims();
        Ok(self.head.forward(last.mean_dim(1).reshape([batch, hidden])))
    }
}

type Train = Autodiff<Cpu>;

fn main() -> jamba::Result<()> {
    let device = Default::default();
    <Train as Backend>::seed(&device, 0);
    let config = JambaConfig::from_json_str(
        r#"{"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
            "attn_layer_period": 4, "attn_layer_offset": 2, "num_experts": 4,
            "expert_layer_period": 2, "expert_layer_offset": 1}"#,
    )?;
    let mut model = Classifier {
        backbone: Jamba::<Train>::init(&config, &device),
        head: LinearConfig::new(64, 2).init(&device),
    };
    let mut optimizer = AdamWConfig::new().init();
    // Class 1 iff the sequence contains token 7.
    let ids = Tensor::<Train, 2, Int>::from_ints([[1, 7, 3, 4], [5, 6, 8, 9], [7, 2, 2, 2], [3, 3, 3, 3]], &device);
    let labels = Tensor::<Train, 1, Int>::from_ints([1, 0, 1, 0], &device);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    for step in 0..5 {
        let loss = loss_fn.forward(model.forward(ids.clone())?, labels.clone());
        println!("step {step}: loss {:.4}", loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(1e-3, model, grads);
    }
    // Inference without autodiff's bookkeeping.
    let valid = model.valid();
    let probs = burn::tensor::activation::softmax(valid.forward(ids.inner())?, 1);
    println!("class probabilities: {:?}", probs.into_data().to_vec::<f32>().unwrap());
    Ok(())
}
