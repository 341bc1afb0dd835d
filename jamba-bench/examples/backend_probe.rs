//! Runs a checkpoint's first layers stage by stage on a backend, reading every intermediate back,
//! to find the first operation a backend rejects. Diagnostic for new backends:
//! `cargo run --release -p jamba-bench --features cuda --example backend_probe -- cuda DIR`
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use jamba::backends::BackendKind;
use jamba::model::{FeedForward, LayerMasks, Mixer};
use jamba::{Jamba, LoadOptions};

fn probe<B: Backend, const D: usize>(stage: &str, t: &Tensor<B, D>) -> bool {
    match t.clone().cast(DType::F32).try_into_data() {
        Ok(d) => {
            let v: Vec<f32> = d.convert::<f32>().into_vec().unwrap();
            println!("ok   {stage:<40} {:?} first {:?}", t.dims(), v.first());
            true
        }
        Err(e) => {
            println!("FAIL {stage:<40} {:?}: {e:?}", t.dims());
            false
        }
    }
}

fn run<B: jamba::JambaBackend>(dir: &str, device: &B::Device) -> jamba::Result<()> {
    println!(
        "supports_dtype(F32) = {}",
        B::supports_dtype(device, DType::F32)
    );
    let up = Tensor::<B, 2>::from_data(TensorData::new(vec![1f32; 12], [3, 4]), device);
    probe("upload [3,4]", &up);
    let up3 = Tensor::<B, 3>::from_data(TensorData::new(vec![1f32; 12], [4, 1, 3]), device);
    probe("upload [4,1,3]", &up3);
    probe("reshape [4,1,3]->[4,3]", &up3.clone().reshape([4, 3]));
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![5i64, 6, 7, 8], [1, 4]), device);
    probe("int upload + float", &ids.clone().float());
    probe("int min", &ids.clone().min().float());
    let model = Jamba::<B>::from_pretrained(dir, device, &LoadOptions::default())?;
    probe("embed weight", &model.embed_tokens.weight.val());
    let x = model.embed_tokens.forward(ids.clone());
    if !probe("embedding", &x) {
        return Ok(());
    }
    let layer = &model.layers[0];
    let n = layer.input_layernorm.forward(x.clone());
    if !probe("input_layernorm", &n) {
        return Ok(());
    }
    if let Mixer::Mamba(m) = &layer.mixer {
        probe("conv weight", &m.conv_weight.val());
        probe("A_log", &m.a_log.val());
        let p = m.in_proj.forward(n.clone());
        if !probe("in_proj", &p) {
            return Ok(());
        }
        let [b, s, _] = p.dims();
        let inner = m.intermediate_size();
        let xs = p.clone().slice([0..b, 0..s, 0..inner]);
        probe("slice x", &xs);
        let conv = B::causal_conv1d(jamba::ops::ConvInput {
            x: xs,
            weight: m.conv_weight.val(),
            bias: m.conv_bias.as_ref().map(|b| b.val()),
            prefix: None,
            silu: false,
        });
        probe("conv", &conv.y);
        probe("conv state", &conv.state);
        let y = m.forward(n.clone(), None, None);
        if !probe("mamba mixer", &y) {
            return Ok(());
        }
    }
    let (y, _) = layer.forward(
        x.clone(),
        &LayerMasks {
            attention: None,
            keep: None,
        },
        None,
    );
    probe("layer 0", &y);
    if let FeedForward::Moe(moe) = &model.layers[1].feed_forward {
        let (y, r) = moe.forward(y.clone());
        probe("moe router", &r);
        probe("moe", &y);
    }
    let out = model.forward(ids, None, None, &Default::default())?;
    probe("logits", &out.logits);
    // The fixture's own prompts, layer by layer (longer sequences take the chunked scan).
    let fixture = jamba::reference::Fixture::open(dir)?;
    let ids = fixture.get("input_ids")?.to_int::<B, 2>(device);
    match ids.clone().max().try_into_data() {
        Ok(d) => println!(
            "ok   fixture ids max {:?}",
            d.convert::<i64>().into_vec::<i64>().unwrap()
        ),
        Err(e) => println!("FAIL fixture ids max: {e:?}"),
    }
    let plain = model.forward(ids.clone(), None, None, &Default::default())?;
    probe("fixture prompt, forward logits", &plain.logits);
    let opts = jamba::ForwardOptions {
        output_hidden_states: true,
        ..Default::default()
    };
    let out = model.forward(ids.clone(), None, None, &opts)?;
    for (i, h) in out.hidden_states.iter().enumerate() {
        probe(&format!("fixture prompt, hidden.{i}"), h);
    }
    let opts = jamba::ForwardOptions {
        output_router_logits: true,
        ..Default::default()
    };
    let out = model.forward(ids.clone(), None, None, &opts)?;
    for (i, r) in &out.router_logits {
        probe(&format!("fixture prompt, router_logits.{i}"), r);
    }
    if let Some(aux) = &out.aux_loss {
        probe("fixture prompt, aux_loss", aux);
    }
    let masks = LayerMasks {
        attention: None,
        keep: None,
    };
    let mut x = model.embed_tokens.forward(ids);
    for (i, layer) in model.layers.iter().enumerate() {
        if let Mixer::Mamba(m) = &layer.mixer {
            let y = m.forward(layer.input_layernorm.forward(x.clone()), None, None);
            if !probe(&format!("fixture prompt, layer {i} mamba mixer"), &y) {
                return Ok(());
            }
        }
        x = layer.forward(x, &masks, None).0;
        if !probe(&format!("fixture prompt, layer {i}"), &x) {
            return Ok(());
        }
    }
    Ok(())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let kind: BackendKind = args.next().unwrap_or("cpu".into()).parse().unwrap();
    let dir = args
        .next()
        .unwrap_or("../shared/fixtures/tiny-jamba".into());
    let r = jamba::with_backend!(kind, |B, device| run::<B>(&dir, &device));
    if let Err(e) = r {
        println!("error: {e}");
    }
}
