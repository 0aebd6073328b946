//! f16 → f32 conversion of stored float columns (F16C where the CPU has it).

use half::f16;

/// f16 → f32 of a whole slice (exact). A sample holds ~0.5 M f16 values; with F16C this costs well under a
/// millisecond in every profile, while half's bulk conversion, inlined into this crate at its dev opt-level
/// with per-chunk debug checks, takes ~2–3 ms.
pub(super) fn f16_to_f32(src: &[f16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU supports F16C and AVX (checked just above).
        unsafe { f16_to_f32_f16c(src, out) };
        return;
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(out);
}

/// Eight values per instruction. Values move as typed arrays (`[f16; 8]` ↔ `__m128i`, `__m256` ↔ `[f32; 8]`):
/// the unaligned load/store intrinsics would go through `ptr::read/write_unaligned`, whose debug precondition
/// checks cost more than the conversion in the dev profile.
///
/// # Safety
/// The CPU must support F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c,avx")]
unsafe fn f16_to_f32_f16c(src: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::{__m128i, __m256, _mm256_cvtph_ps};
    let whole = src.len().min(out.len()) / 8 * 8;
    let mut i = 0;
    while i < whole {
        let h: [f16; 8] = *<&[f16; 8]>::try_from(&src[i..i + 8]).expect("8 values");
        let o = <&mut [f32; 8]>::try_from(&mut out[i..i + 8]).expect("8 values");
        // SAFETY: [f16; 8] and __m128i are both 16 plain bytes; __m256 and [f32; 8] both 32.
        *o = unsafe {
            std::mem::transmute::<__m256, [f32; 8]>(_mm256_cvtph_ps(std::mem::transmute::<
                [f16; 8],
                __m128i,
            >(h)))
        };
        i += 8;
    }
    for (o, h) in out[whole..].iter_mut().zip(&src[whole..]) {
        *o = h.to_f32();
    }
}
