//! ONNX export of the inference network (decoder excluded), for ONNX Runtime and TensorRT
//! (`trtexec --onnx`). The protobuf messages are the subset of `onnx.proto` we emit, declared
//! with prost's derive (field numbers from onnx.proto), so no protoc is needed to build.
//! Weights are written as f32 initializers, the values wae-edge computes with on the CPU.
//! The graph takes the normalised `[batch, C, H, W]` input; preprocessing stays outside.

use crate::config::{ArchKind, ModelConfig, CONFIG_KEY};
use crate::weights::{ModelFile, WeightsError};

/// `onnx.TensorProto.DataType.FLOAT`.
const FLOAT: i32 = 1;
/// `onnx.TensorProto.DataType.INT64`.
const INT64: i32 = 7;
/// Opset the graph is written for.
pub const OPSET: i64 = 17;

#[allow(missing_docs)]
pub mod proto {
    //! The ONNX messages wae-edge writes.

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(int64, optional, tag = "1")]
        pub ir_version: Option<i64>,
        #[prost(string, optional, tag = "2")]
        pub producer_name: Option<String>,
        #[prost(string, optional, tag = "3")]
        pub producer_version: Option<String>,
        #[prost(string, optional, tag = "6")]
        pub doc_string: Option<String>,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OperatorSetIdProto>,
        #[prost(message, repeated, tag = "14")]
        pub metadata_props: Vec<StringStringEntryProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OperatorSetIdProto {
        #[prost(string, optional, tag = "1")]
        pub domain: Option<String>,
        #[prost(int64, optional, tag = "2")]
        pub version: Option<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StringStringEntryProto {
        #[prost(string, optional, tag = "1")]
        pub key: Option<String>,
        #[prost(string, optional, tag = "2")]
        pub value: Option<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(string, optional, tag = "2")]
        pub name: Option<String>,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfoProto>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfoProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, optional, tag = "3")]
        pub name: Option<String>,
        #[prost(string, optional, tag = "4")]
        pub op_type: Option<String>,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeProto {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(float, optional, tag = "2")]
        pub f: Option<f32>,
        #[prost(int64, optional, tag = "3")]
        pub i: Option<i64>,
        #[prost(int64, repeated, tag = "8")]
        pub ints: Vec<i64>,
        /// AttributeType: FLOAT 1, INT 2, INTS 7.
        #[prost(int32, optional, tag = "20")]
        pub r#type: Option<i32>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, optional, tag = "2")]
        pub data_type: Option<i32>,
        #[prost(string, optional, tag = "8")]
        pub name: Option<String>,
        #[prost(bytes = "vec", optional, tag = "9")]
        pub raw_data: Option<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfoProto {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<TypeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeProto {
        #[prost(message, optional, tag = "1")]
        pub tensor_type: Option<TensorTypeProto>,
    }

    /// `TypeProto.Tensor`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorTypeProto {
        #[prost(int32, optional, tag = "1")]
        pub elem_type: Option<i32>,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<TensorShapeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "1")]
        pub dim: Vec<Dimension>,
    }

    /// `TensorShapeProto.Dimension` (one of value or param).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(int64, optional, tag = "1")]
        pub dim_value: Option<i64>,
        #[prost(string, optional, tag = "2")]
        pub dim_param: Option<String>,
    }
}

use proto::*;

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(7),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(2),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Dimension]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: Some(FLOAT),
                shape: Some(TensorShapeProto { dim: dims.to_vec() }),
            }),
        }),
    }
}

fn dim(v: usize) -> Dimension {
    Dimension {
        dim_value: Some(v as i64),
        dim_param: None,
    }
}

/// Builds the graph node by node, pulling weights from the model file by name.
struct Graph<'a> {
    file: &'a ModelFile,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    next: usize,
}

impl Graph<'_> {
    fn fresh(&mut self, what: &str) -> String {
        self.next += 1;
        format!("{what}_{}", self.next)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, out: &str) -> String {
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            name: Some(name),
            op_type: Some(op.into()),
            attribute: attrs,
        });
        out.to_string()
    }

    fn init_f32(&mut self, name: &str, dims: &[usize], values: &[f32]) {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(FLOAT),
            name: Some(name.into()),
            raw_data: Some(raw),
        });
    }

    fn init_i64(&mut self, name: &str, values: &[i64]) {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: Some(INT64),
            name: Some(name.into()),
            raw_data: Some(raw),
        });
    }

    /// Copies a weight from the model file (f16 -> f32) as an initializer with the same name.
    fn weight(&mut self, name: &str) -> Result<String, WeightsError> {
        let (shape, values) = self.file.tensor_f32(name)?;
        self.init_f32(name, &shape, &values);
        Ok(name.to_string())
    }

    fn conv(
        &mut self,
        x: &str,
        at: &str,
        kernel: i64,
        stride: i64,
        relu: bool,
    ) -> Result<String, WeightsError> {
        let w = self.weight(&format!("{at}.weight"))?;
        let b = self.weight(&format!("{at}.bias"))?;
        let pad = (kernel - 1) / 2;
        let attrs = vec![
            ints("kernel_shape", &[kernel, kernel]),
            ints("strides", &[stride, stride]),
            ints("pads", &[pad, pad, pad, pad]),
        ];
        let out = self.fresh(&format!("{at}.out"));
        let y = self.node("Conv", &[x, &w, &b], attrs, &out);
        Ok(if relu {
            self.node("Relu", &[&y], vec![], &format!("{out}.relu"))
        } else {
            y
        })
    }

    fn stack(
        &mut self,
        x: &str,
        at: &str,
        stages: &[Vec<usize>],
        ceil: bool,
    ) -> Result<String, WeightsError> {
        let mut x = x.to_string();
        for (s, widths) in stages.iter().enumerate() {
            for i in 0..widths.len() {
                x = self.conv(&x, &format!("{at}.s{s}.c{i}"), 3, 1, true)?;
            }
            let out = self.fresh(&format!("{at}.pool{s}"));
            let attrs = vec![
                ints("kernel_shape", &[2, 2]),
                ints("strides", &[2, 2]),
                int("ceil_mode", ceil as i64),
            ];
            x = self.node("MaxPool", &[&x], attrs, &out);
        }
        Ok(x)
    }

    fn head(&mut self, x: &str, at: &str, layers: usize) -> Result<String, WeightsError> {
        let flat = self.fresh(&format!("{at}.flat"));
        let mut x = self.node("Flatten", &[x], vec![int("axis", 1)], &flat);
        for i in 0..layers {
            let w = self.weight(&format!("{at}.fc{i}.weight"))?;
            let b = self.weight(&format!("{at}.fc{i}.bias"))?;
            let out = self.fresh(&format!("{at}.fc{i}"));
            x = self.node("Gemm", &[&x, &w, &b], vec![int("transB", 1)], &out);
            if i + 1 < layers {
                x = self.node("Relu", &[&x], vec![], &format!("{out}.relu"));
            }
        }
        Ok(x)
    }
}

/// The inference network of a validated model file as an encoded ONNX `ModelProto`.
pub fn export(file: &ModelFile) -> Result<Vec<u8>, WeightsError> {
    use prost::Message;
    let c: &ModelConfig = file.config();
    let a = &c.arch;
    let mut g = Graph {
        file,
        nodes: vec![],
        inits: vec![],
        next: 0,
    };
    let ch = c.input.channels;
    let (low, high) = match a.kind {
        ArchKind::Plain => ("input".to_string(), None),
        ArchKind::NaiveHalf => {
            let attrs = vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])];
            (g.node("AveragePool", &["input"], attrs, "I_L"), None)
        }
        ArchKind::Haar => {
            let k = crate::model::haar_kernel_values(ch);
            g.init_f32("haar.kernel", &[4 * ch, ch, 2, 2], &k);
            let attrs = vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])];
            let bands = g.node("Conv", &["input", "haar.kernel"], attrs, "haar.bands");
            g.init_i64("haar.axes", &[1]);
            for (name, lo, hi) in [("low", 0, ch), ("high", ch, 4 * ch)] {
                g.init_i64(&format!("haar.{name}.starts"), &[lo as i64]);
                g.init_i64(&format!("haar.{name}.ends"), &[hi as i64]);
            }
            let l = g.node(
                "Slice",
                &[&bands, "haar.low.starts", "haar.low.ends", "haar.axes"],
                vec![],
                "I_L",
            );
            let h = g.node(
                "Slice",
                &[&bands, "haar.high.starts", "haar.high.ends", "haar.axes"],
                vec![],
                "I_H",
            );
            (l, Some(h))
        }
        ArchKind::Wae => {
            let mut x = "input".to_string();
            for i in 0..a.encoder.len() {
                x = g.conv(&x, &format!("encoder.conv{i}"), 3, 1, true)?;
            }
            let l = g.conv(&x, "encoder.low", 3, 2, false)?;
            let h = g.conv(&x, "encoder.high", 3, 2, false)?;
            let l = g.node("Identity", &[&l], vec![], "I_L");
            let h = g.node("Identity", &[&h], vec![], "I_H");
            (l, Some(h))
        }
    };
    let f_low = g.stack(&low, "backbone", &a.backbone, a.pool_ceil)?;
    let logits_low = g.head(&f_low, "head_low", a.head_low.len() + 1)?;
    match high {
        Some(h) => {
            let f_high = g.stack(&h, "branch", &c.branch_stages(), a.pool_ceil)?;
            let cat = g.node("Concat", &[&f_low, &f_high], vec![int("axis", 1)], "fused");
            let logits_fuse = g.head(&cat, "head_fuse", a.head_fuse.len() + 1)?;
            g.node("Add", &[&logits_low, &logits_fuse], vec![], "logits");
        }
        None => {
            g.node("Identity", &[&logits_low], vec![], "logits");
        }
    }
    let batch = Dimension {
        dim_value: None,
        dim_param: Some("batch".into()),
    };
    let graph = GraphProto {
        node: g.nodes,
        name: Some(c.name.clone()),
        initializer: g.inits,
        input: vec![value_info(
            "input",
            &[
                batch.clone(),
                dim(ch),
                dim(c.input.height),
                dim(c.input.width),
            ],
        )],
        output: vec![value_info("logits", &[batch, dim(c.classes)])],
    };
    let model = ModelProto {
        ir_version: Some(8),
        producer_name: Some("wae-edge".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(format!(
            "{}: normalised [batch, {ch}, {}, {}] input -> logits",
            c.name, c.input.height, c.input.width
        )),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        metadata_props: vec![StringStringEntryProto {
            key: Some(CONFIG_KEY.into()),
            value: Some(c.to_json()),
        }],
    };
    Ok(model.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn export_has_every_inference_weight_and_no_decoder() {
        let cfg = crate::config::preset("wae-fashion").unwrap();
        let (cfg, tensors) = crate::weights::random_model(&cfg, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        crate::weights::save(&p, &cfg, &tensors).unwrap();
        let bytes = export(&ModelFile::open(&p).unwrap()).unwrap();
        let m = ModelProto::decode(&bytes[..]).unwrap();
        let g = m.graph.unwrap();
        let inits: Vec<String> = g
            .initializer
            .iter()
            .map(|t| t.name.clone().unwrap())
            .collect();
        for (name, _) in crate::weights::inference_tensors(&cfg) {
            assert!(inits.contains(&name), "{name} missing");
        }
        assert!(!inits.iter().any(|n| n.starts_with("decoder")));
        assert_eq!(g.output[0].name.as_deref(), Some("logits"));
        let ops: Vec<&str> = g.node.iter().filter_map(|n| n.op_type.as_deref()).collect();
        assert!(ops.contains(&"Concat") && ops.contains(&"Add") && ops.contains(&"MaxPool"));
        assert_eq!(m.opset_import[0].version, Some(OPSET));
    }
}
