//! Checkpoint loading and saving: every way a checkpoint can be broken gets an error naming the
//! file and the tensor, and a saved model loads back to the same outputs.

mod common;

use std::path::Path;

use burn::tensor::{Int, Tensor};
use jamba::reference::to_vec;
use jamba::{ForwardOptions, Jamba, JambaError, LoadOptions};
use safetensors::tensor::{Dtype, TensorView};

type B = jamba::backends::Cpu;

/// (name, dtype, shape, bytes) of every tensor in a safetensors file.
fn read_all(path: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect()
}

fn write_all(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A copy of `fixture` whose `model.safetensors` went through `edit`.
fn broken(
    fixture: &str,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> std::path::PathBuf {
    let dir = common::copy_fixture(fixture);
    let path = dir.join("model.safetensors");
    let mut tensors = read_all(&path);
    edit(&mut tensors);
    write_all(&path, &tensors);
    dir
}

fn load(dir: &Path) -> Result<Jamba<B>, JambaError> {
    Jamba::<B>::from_pretrained(dir, &Default::default(), &LoadOptions::default())
}

const D: &str = "model.layers.0.mamba.D";

#[test]
fn missing_tensor() {
    let dir = broken("tiny-mamba-dense-tied", |t| t.retain(|(n, ..)| n != D));
    let err = load(&dir).unwrap_err();
    assert!(
        matches!(&err, JambaError::MissingTensor { name, .. } if name == D),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(D) && err.to_string().contains("[96]"),
        "{err}"
    );
}

#[test]
fn extra_tensor() {
    let dir = broken("tiny-mamba-dense-tied", |t| {
        t.push((
            "model.layers.0.mamba.surprise".into(),
            Dtype::F32,
            vec![2],
            vec![0; 8],
        ))
    });
    let err = load(&dir).unwrap_err();
    assert!(
        matches!(&err, JambaError::UnexpectedTensor { name, .. } if name == "model.layers.0.mamba.surprise"),
        "{err:?}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn wrong_shape_names_both_shapes() {
    let dir = broken("tiny-mamba-dense-tied", |t| {
        let entry = t
            .iter_mut()
            .find(|(n, ..)| n == "model.layers.1.mamba.A_log")
            .unwrap();
        entry.2 = vec![4, 96]; // transposed
    });
    let err = load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, JambaError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.1.mamba.A_log")
            && msg.contains("[4, 96]")
            && msg.contains("[96, 4]"),
        "{msg}"
    );
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn unsupported_dtype() {
    let dir = broken("tiny-mamba-dense-tied", |t| {
        let entry = t.iter_mut().find(|(n, ..)| n == D).unwrap();
        entry.1 = Dtype::I32;
    });
    let err = load(&dir).unwrap_err();
    assert!(
        matches!(&err, JambaError::UnsupportedDtype { name, .. } if name == D),
        "{err:?}"
    );
    assert!(err.to_string().contains("I32"), "{err}");
}

#[test]
fn truncated_file() {
    let dir = common::copy_fixture("tiny-mamba-dense-tied");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, JambaError::Safetensors { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // A header cut in the middle too.
    std::fs::write(&path, &bytes[..40]).unwrap();
    assert!(matches!(
        load(&dir).unwrap_err(),
        JambaError::Safetensors { .. }
    ));
}

#[test]
fn malformed_config() {
    let dir = common::copy_fixture("tiny-mamba-dense-tied");
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 48,").unwrap();
    let err = load(&dir).unwrap_err();
    assert!(
        matches!(err, JambaError::Json { .. }) && err.to_string().contains("config.json"),
        "{err}"
    );
}

#[test]
fn config_that_disagrees_with_the_weights() {
    let dir = common::copy_fixture("tiny-mamba-dense-tied");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"mamba_d_state\": 4", "\"mamba_d_state\": 8");
    std::fs::write(&path, text).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, JambaError::ShapeMismatch { .. }), "{err}");
}

#[test]
fn absent_shard() {
    let dir = common::copy_fixture("tiny-jamba-v01-pattern");
    std::fs::remove_file(dir.join("model-00003-of-00004.safetensors")).unwrap();
    let err = load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model-00003-of-00004.safetensors") && msg.contains("index"),
        "{msg}"
    );
}

#[test]
fn index_naming_a_tensor_its_shard_lacks() {
    let dir = common::copy_fixture("tiny-jamba-v01-pattern");
    let path = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "\"weight_map\": {",
        "\"weight_map\": {\n    \"model.layers.0.mamba.ghost\": \"model-00001-of-00004.safetensors\",",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(
        matches!(&err, JambaError::MissingTensor { name, .. } if name == "model.layers.0.mamba.ghost"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("model-00001-of-00004.safetensors"),
        "{err}"
    );
}

#[test]
fn malformed_index() {
    let dir = common::copy_fixture("tiny-jamba-v01-pattern");
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        "{\"weight_map\": 3}",
    )
    .unwrap();
    let err = load(&dir).unwrap_err();
    assert!(
        matches!(err, JambaError::Json { .. }) && err.to_string().contains("index.json"),
        "{err}"
    );
}

#[test]
fn no_weights() {
    let dir = common::copy_fixture("tiny-mamba-dense-tied");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(matches!(
        load(&dir).unwrap_err(),
        JambaError::NoWeights { .. }
    ));
}

fn logits(model: &Jamba<B>) -> Vec<f32> {
    let ids = Tensor::<B, 2, Int>::from_ints([[5, 17, 3, 42, 9, 11, 100, 7]], &Default::default());
    to_vec(
        model
            .forward(ids, None, None, &ForwardOptions::default())
            .unwrap()
            .logits,
    )
}

#[test]
fn save_and_load_round_trip() {
    for name in ["tiny-jamba", "tiny-mamba-dense-tied"] {
        let model = load(&common::fixture(name)).unwrap();
        let out = common::temp_dir("saved");
        model.save_pretrained(&out).unwrap();
        let saved = read_all(&out.join("model.safetensors"));
        let original = read_all(&common::fixture(name).join("model.safetensors"));
        let mut names: Vec<_> = saved.iter().map(|t| (t.0.clone(), t.2.clone())).collect();
        let mut expected: Vec<_> = original
            .iter()
            .map(|t| (t.0.clone(), t.2.clone()))
            .collect();
        names.sort();
        expected.sort();
        assert_eq!(
            names, expected,
            "{name}: the saved keys and shapes are the hub's"
        );
        let again = load(&out).unwrap();
        assert_eq!(logits(&model), logits(&again), "{name}");
    }
}

#[test]
fn half_precision_weights_on_disk() {
    let dir = broken("tiny-jamba", |t| {
        for (_, dtype, _, bytes) in t.iter_mut() {
            let f: Vec<u8> = bytes
                .chunks_exact(4)
                .flat_map(|b| {
                    half::f16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes()
                })
                .collect();
            *dtype = Dtype::F16;
            *bytes = f;
        }
    });
    let f16 = logits(&load(&dir).unwrap());
    let f32 = logits(&load(&common::fixture("tiny-jamba")).unwrap());
    let err = jamba::reference::rel_err(&f16, &f32);
    assert!(
        err > 0.0 && err < 2e-2,
        "f16-rounded weights give rel. error {err}"
    );
}

/// ndarray has no bf16 tensors: asking for them is an error, not a panic inside the backend.
#[cfg(feature = "ndarray")]
#[test]
fn unsupported_compute_dtype_is_an_error() {
    let options = LoadOptions {
        dtype: Some(burn::tensor::DType::BF16),
        ..Default::default()
    };
    let err = Jamba::<burn::backend::NdArray>::from_pretrained(
        common::fixture("tiny-jamba"),
        &Default::default(),
        &options,
    )
    .unwrap_err();
    assert!(err.to_string().contains("BF16"), "{err}");
}
