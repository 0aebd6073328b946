//! Gradient checkpointing for reverse mode (candle has none).
//!
//! A [`Recompute`] tape runs a model as a chain of segments (e.g. the embeddings, each transformer block, the
//! output head). Each segment runs once forward with whatever graph its weights build; its outputs are then
//! detached and kept (the segment boundaries, "slots") and the segment's graph with every intermediate
//! activation is dropped. So the forward holds one segment's activations at a time plus the boundaries.
//!
//! [`Recompute::backward`] walks the segments in reverse: it makes the segment's inputs fresh leaf `Var`s,
//! reruns the segment with graph, backpropagates the surrogate Σ sum(output ⊙ cotangent) (whose gradient
//! with respect to each output is exactly that output's cotangent), adds the gradients of every model `Var`
//! the segment read into the caller's `GradStore`, passes the inputs' gradients on as cotangents of the slots
//! that produced them, and drops the recomputed graph before the next segment. A slot read by several
//! segments (a shared conditioning input) sums the cotangents of all its readers, in f32. Gradients reach
//! `Var`s through any differentiable op, a `to_dtype` cast of f32 master weights to a bf16 working copy
//! included.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};

use crate::{Error, Result};

/// A segment boundary value recorded on a [`Recompute`] tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot(usize);

/// One model segment: slot inputs → slot outputs, rerunnable.
type SegmentFn = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync>;

struct Segment {
    inputs: Vec<Slot>,
    outputs: Vec<Slot>,
    run: SegmentFn,
}

/// A recorded forward pass kept as segment boundaries only, able to replay its reverse pass segment by segment.
#[derive(Default)]
pub struct Recompute {
    segments: Vec<Segment>,
    /// Detached value of every slot, in recording order.
    values: Vec<Tensor>,
}

impl std::fmt::Debug for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recompute")
            .field("segments", &self.segments.len())
            .field("slots", &self.values.len())
            .finish()
    }
}

/// Adds `grad` to `store`'s entry for `id` (inserting it when absent).
fn accumulate(store: &mut GradStore, id: TensorId, grad: Tensor) -> Result<()> {
    let sum = match store.get_id(id) {
        Some(previous) => previous.add(&grad)?,
        None => grad,
    };
    store.insert_id(id, sum);
    Ok(())
}

/// Adds `grad` to the pending cotangent `slot`, summing in f32 (f64 stays f64).
fn accumulate_cotangent(slot: &mut Option<Tensor>, grad: Tensor) -> Result<()> {
    let grad = if grad.dtype() == DType::F64 {
        grad
    } else {
        grad.to_dtype(DType::F32)?
    };
    *slot = Some(match slot.take() {
        Some(previous) => previous.add(&grad)?,
        None => grad,
    });
    Ok(())
}

impl Recompute {
    /// An empty tape.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of recorded segments.
    pub fn num_segments(&self) -> usize {
        self.segments.len()
    }

    /// The recorded (detached) value of `slot`.
    pub fn value(&self, slot: Slot) -> &Tensor {
        &self.values[slot.0]
    }

    /// Total bytes held by the recorded boundary values.
    pub fn saved_bytes(&self) -> usize {
        self.values
            .iter()
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }

    /// Runs `run` on the values of `inputs` now and records it as the next segment; returns slots for its
    /// outputs. `run` must compute the same function every time it is called (it is rerun in `backward`);
    /// constants it needs (model weights, fixed inputs, masks) are captured by the closure, and only values
    /// that need a gradient pass through slots. The outputs are kept detached: the graph built while running
    /// is dropped before this returns.
    pub fn record<F>(&mut self, inputs: &[Slot], run: F) -> Result<Vec<Slot>>
    where
        F: Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync + 'static,
    {
        let values: Vec<Tensor> = inputs.iter().map(|s| self.values[s.0].clone()).collect();
        let outputs = run(&values)?;
        let first = self.values.len();
        self.values.extend(outputs.iter().map(Tensor::detach));
        let outputs: Vec<Slot> = (first..self.values.len()).map(Slot).collect();
        self.segments.push(Segment {
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
            run: Box::new(run),
        });
        Ok(outputs)
    }

    /// Accumulates into `grads` the gradient of sum(out ⊙ `out_grad`) with respect to every `Var` the tape's
    /// segments read, where `out` is the single output of the last recorded segment. Entries already in
    /// `grads` are added to.
    pub fn backward(&self, out_grad: &Tensor, grads: &mut GradStore) -> Result<()> {
        let last = self.segments.last().ok_or_else(|| {
            Error::Arg("gradient checkpointing: backward on an empty tape".into())
        })?;
        let [output] = last.outputs.as_slice() else {
            return Err(Error::Arg(format!(
                "gradient checkpointing: the last segment has {} outputs; use backward_from",
                last.outputs.len()
            )));
        };
        self.backward_from(&[(*output, out_grad.clone())], grads)
    }

    /// Accumulates into `grads` the gradient of Σ sum(value(slot) ⊙ cotangent) over `cotangents` with respect
    /// to every `Var` the tape's segments read.
    pub fn backward_from(
        &self,
        cotangents: &[(Slot, Tensor)],
        grads: &mut GradStore,
    ) -> Result<()> {
        let mut pending: Vec<Option<Tensor>> = vec![None; self.values.len()];
        for (slot, grad) in cotangents {
            let value = &self.values[slot.0];
            if grad.shape() != value.shape() {
                return Err(Error::Arg(format!(
                    "gradient checkpointing: cotangent of shape {:?} for a value of shape {:?}",
                    grad.dims(),
                    value.dims()
                )));
            }
            accumulate_cotangent(&mut pending[slot.0], grad.detach())?;
        }
        for segment in self.segments.iter().rev() {
            let output_grads: Vec<(usize, Tensor)> = segment
                .outputs
                .iter()
                .enumerate()
                .filter_map(|(i, slot)| pending[slot.0].take().map(|g| (i, g)))
                .collect();
            if output_grads.is_empty() {
                continue; // nothing downstream depends on this segment
            }
            let leaves = segment
                .inputs
                .iter()
                .map(|slot| Var::from_tensor(&self.values[slot.0]))
                .collect::<candle_core::Result<Vec<Var>>>()?;
            let leaf_values: Vec<Tensor> = leaves.iter().map(|v| v.as_tensor().clone()).collect();
            let outputs = (segment.run)(&leaf_values)?;
            drop(leaf_values);
            if outputs.len() != segment.outputs.len() {
                return Err(Error::Arg(format!(
                    "gradient checkpointing: a segment recorded with {} outputs returned {} on recompute",
                    segment.outputs.len(),
                    outputs.len()
                )));
            }
            let mut surrogate: Option<Tensor> = None;
            for (i, grad) in output_grads {
                let term = outputs[i].to_dtype(grad.dtype())?.mul(&grad)?.sum_all()?;
                surrogate = Some(match surrogate {
                    Some(s) => s.add(&term)?,
                    None => term,
                });
            }
            drop(outputs);
            let surrogate = surrogate.expect("at least one output has a cotangent");
            let vars: Vec<Tensor> = surrogate
                .sorted_nodes()
                .into_iter()
                .filter(|node| node.is_variable())
                .cloned()
                .collect();
            let mut store = surrogate.backward()?;
            drop(surrogate); // frees the recomputed activations
            for (leaf, slot) in leaves.iter().zip(&segment.inputs) {
                if let Some(grad) = store.remove(leaf.as_tensor()) {
                    accumulate_cotangent(&mut pending[slot.0], grad)?;
                }
            }
            for var in vars {
                if let Some(grad) = store.remove(&var) {
                    accumulate(grads, var.id(), grad)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::max_abs_diff;
    use candle_core::Device;

    /// A three-segment chain with a shared input read by two segments and a bf16 cast of an f32 weight, against
    /// one plain backward over the whole graph.
    #[test]
    fn tape_gradients_match_plain_backward() -> Result<()> {
        let dev = Device::Cpu;
        let w1 = Var::randn(0f32, 0.5, (4, 4), &dev)?;
        let w2 = Var::randn(0f32, 0.5, (4, 4), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let cot = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let w2_bf16 = w2.as_tensor().to_dtype(DType::BF16)?;

        let embed = {
            let (w1, x) = (w1.as_tensor().clone(), x.clone());
            move |_: &[Tensor]| -> Result<Vec<Tensor>> {
                let h = x.matmul(&w1)?;
                Ok(vec![h.tanh()?, h.sqr()?.sum_keepdim(1)?])
            }
        };
        let layer = {
            let w2 = w2_bf16.clone();
            move |inp: &[Tensor]| -> Result<Vec<Tensor>> {
                let h = inp[0]
                    .to_dtype(DType::BF16)?
                    .matmul(&w2)?
                    .to_dtype(DType::F32)?;
                Ok(vec![h.broadcast_mul(&inp[1])?.tanh()?])
            }
        };
        let head = |inp: &[Tensor]| -> Result<Vec<Tensor>> {
            Ok(vec![inp[0].broadcast_add(&inp[1])?.sin()?])
        };

        let mut tape = Recompute::new();
        let e = tape.record(&[], embed.clone())?;
        let h = tape.record(&[e[0], e[1]], layer.clone())?;
        let out = tape.record(&[h[0], e[1]], head)?;
        let value = tape.value(out[0]).clone();
        assert!(!value.track_op(), "recorded values carry no graph");

        let e_ref = embed(&[])?;
        let h_ref = layer(&[e_ref[0].clone(), e_ref[1].clone()])?;
        let out_ref = head(&[h_ref[0].clone(), e_ref[1].clone()])?.remove(0);
        assert_eq!(max_abs_diff(&value, &out_ref), 0.0);
        let want = (&out_ref * &cot)?.sum_all()?.backward()?;

        // the caller's store already holds a gradient for w1: backward must add to it
        let mut grads = (w1.as_tensor().sum_all()? * 2.0)?.backward()?;
        tape.backward(&cot, &mut grads)?;
        let w1_want = (want.get(&w1).unwrap() + 2.0)?;
        assert!(max_abs_diff(grads.get(&w1).unwrap(), &w1_want) < 1e-6);
        assert!(max_abs_diff(grads.get(&w2).unwrap(), want.get(&w2).unwrap()) < 1e-6);
        Ok(())
    }
}
