//! sprint-train refuses what it cannot do exactly, before writing anything: a resume with another store or other
//! batch settings, a teacher of another width or latent channel count, head blocks beyond the teacher's depth,
//! a store with fewer rows than one batch, and `--checkpoints_total_limit 0`. A limit of 1 works with resume. Setup helpers live in `train_loop`.

use std::path::Path;

use sana_sprint::train::checkpoint;
use sana_sprint::train::trainer::{self, TrainOptions};

use crate::train_loop::{
    copy_teacher, edit_json, options, saved_student, small_store, snapshot, tensors,
};

/// A finished 2-step run in `out` (checkpoint-2 and the export).
fn trained_run(out: &Path) {
    let mut o = options(out);
    o.max_train_steps = Some(2);
    trainer::run(&o).unwrap();
}

/// Resuming the run in `out` with `change` applied is refused with an error containing every one of `needles`,
/// and leaves the folder exactly as it was.
fn assert_resume_refused(out: &Path, change: impl FnOnce(&mut TrainOptions), needles: &[&str]) {
    let before = snapshot(out);
    let mut o = options(out);
    o.max_train_steps = Some(4);
    o.resume_from_checkpoint = Some("latest".into());
    change(&mut o);
    let err = trainer::run(&o).unwrap_err().to_string();
    for needle in needles {
        assert!(err.contains(needle), "error lacks {needle:?}: {err}");
    }
    assert!(
        snapshot(out) == before,
        "the refused resume changed {}",
        out.display()
    );
}

#[test]
fn resume_with_another_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    trained_run(dir.path());
    assert_resume_refused(
        dir.path(),
        |o| o.latents = small_store().to_path_buf(),
        &["store rows was 24", "is 8 now", "checkpoint-2"],
    );
}

#[test]
fn resume_with_another_batch_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    trained_run(dir.path());
    assert_resume_refused(
        dir.path(),
        |o| o.train_batch_size = 4,
        &["--train_batch_size was 2", "is 4 now"],
    );
}

#[test]
fn resume_with_another_accumulation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    trained_run(dir.path());
    assert_resume_refused(
        dir.path(),
        |o| o.gradient_accumulation_steps = 2,
        &["--gradient_accumulation_steps was 1", "is 2 now"],
    );
}

/// A run on a copy of the tiny teacher whose transformer config has `edit` applied is refused with an error
/// containing every one of `needles`, before the output folder is created. The copy's weights still have the
/// tiny teacher's shapes, so the check must come before any weight is loaded.
fn assert_teacher_refused(edit: impl FnOnce(&mut serde_json::Value), needles: &[&str]) {
    let teacher = copy_teacher();
    edit_json(&teacher.path().join("transformer/config.json"), edit);
    let out = tempfile::tempdir().unwrap();
    let mut o = options(&out.path().join("run"));
    o.pretrained_model_name_or_path = teacher.path().to_path_buf();
    let err = trainer::run(&o).unwrap_err().to_string();
    for needle in needles {
        assert!(err.contains(needle), "error lacks {needle:?}: {err}");
    }
    assert!(
        !o.output_dir.exists(),
        "a refused run wrote {}",
        o.output_dir.display()
    );
}

#[test]
fn teacher_of_another_width_is_refused() {
    assert_teacher_refused(
        |c| c["caption_channels"] = 32.into(),
        &["64-wide", "caption_channels is 32"],
    );
}

#[test]
fn teacher_of_another_latent_channel_count_is_refused() {
    assert_teacher_refused(
        |c| {
            c["in_channels"] = 16.into();
            c["out_channels"] = 16.into();
        },
        &["latents have 32 channels", "teacher expects 16"],
    );
}

#[test]
fn head_block_ids_beyond_the_teacher_are_refused() {
    let out = tempfile::tempdir().unwrap();
    let mut o = options(&out.path().join("run"));
    o.head_block_ids = vec![2, 20];
    let err = trainer::run(&o).unwrap_err().to_string();
    assert!(
        err.contains("--head_block_ids names block 20") && err.contains("20 blocks"),
        "{err}"
    );
    assert!(
        !o.output_dir.exists(),
        "a refused run wrote {}",
        o.output_dir.display()
    );
    // the deepest block exists
    o.head_block_ids = vec![2, 19];
    o.max_train_steps = Some(2);
    assert_eq!(trainer::run(&o).unwrap().global_step, 2);
    let heads = tensors(&o.output_dir.join(checkpoint::HEADS_FILE));
    assert!(
        heads.keys().any(|k| k.starts_with("1.")) && !heads.keys().any(|k| k.starts_with("2."))
    );
}

#[test]
fn checkpoints_total_limit_one_with_resume() {
    let kept = |dir: &Path| -> Vec<u64> {
        checkpoint::list_checkpoints(dir)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    };
    let limited = |out: &Path| {
        let mut o = options(out);
        o.max_train_steps = Some(6);
        o.checkpoints_total_limit = Some(1);
        o
    };
    let dir = tempfile::tempdir().unwrap();
    let mut first = limited(dir.path());
    first.kill_after_step = Some(4);
    trainer::run(&first).unwrap();
    assert_eq!(
        kept(dir.path()),
        vec![4],
        "only the newest checkpoint is kept"
    );
    let mut second = limited(dir.path());
    second.resume_from_checkpoint = Some("latest".into());
    let s = trainer::run(&second).unwrap();
    assert_eq!(s.resumed_from.unwrap(), dir.path().join("checkpoint-4"));
    assert_eq!(s.global_step, 6);
    assert_eq!(kept(dir.path()), vec![6]);
    // the resume continued the run: it ends where a run without a limit ends
    let straight = tempfile::tempdir().unwrap();
    let mut o = limited(straight.path());
    o.checkpoints_total_limit = None;
    trainer::run(&o).unwrap();
    assert_eq!(kept(straight.path()), vec![2, 4, 6]);
    let (a, b) = (saved_student(dir.path()), saved_student(straight.path()));
    for (name, x) in &a {
        let same = x
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{name} differs from the run without a limit");
    }
}

#[test]
fn checkpoints_total_limit_zero_is_rejected() {
    let out = tempfile::tempdir().unwrap();
    let mut o = options(&out.path().join("run"));
    o.checkpoints_total_limit = Some(0);
    let err = trainer::run(&o).unwrap_err().to_string();
    assert!(
        err.contains("--checkpoints_total_limit must be at least 1"),
        "{err}"
    );
    assert!(
        !o.output_dir.exists(),
        "a refused run wrote {}",
        o.output_dir.display()
    );
}

#[test]
fn a_store_smaller_than_one_batch_is_refused_before_writing() {
    let out = tempfile::tempdir().unwrap();
    let mut o = options(&out.path().join("run"));
    o.train_batch_size = 64; // the demo store holds 24 rows
    let err = trainer::run(&o).unwrap_err().to_string();
    assert!(
        err.contains("less than one batch of 64 (--train_batch_size)"),
        "{err}"
    );
    assert!(
        !o.output_dir.exists(),
        "a refused run wrote {}",
        o.output_dir.display()
    );
}
