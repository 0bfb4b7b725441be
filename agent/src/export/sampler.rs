//! Trace sampling, configured like `OTEL_TRACES_SAMPLER`/`_ARG`. Decided per
//! span from its trace id, so both sides of a linked call agree.
use crate::span::Span;

/// A sampler as in the OpenTelemetry SDK specification.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Keep traces whose id falls below the ratio.
    TraceIdRatio(f64),
    /// Follow a remote parent's sampled flag; use the inner sampler for roots.
    ParentBased(Root),
}

/// Root samplers usable inside `ParentBased`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
}

fn ratio_arg(arg: Option<&str>) -> Result<f64, String> {
    let Some(raw) = arg else {
        return Ok(1.0);
    };
    match raw.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("sampler argument `{raw}` must be a ratio between 0.0 and 1.0")),
    }
}

impl Sampler {
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Self, String> {
        Ok(match name.trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatio(ratio_arg(arg)?),
            "parentbased_always_on" => Sampler::ParentBased(Root::AlwaysOn),
            "parentbased_always_off" => Sampler::ParentBased(Root::AlwaysOff),
            "parentbased_traceidratio" => Sampler::ParentBased(Root::TraceIdRatio(ratio_arg(arg)?)),
            other => {
                return Err(format!(
                    "unknown sampler `{other}`; use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ))
            }
        })
    }

    /// Whether `span` is exported.
    pub fn sample(&self, span: &Span) -> bool {
        match *self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::TraceIdRatio(r) => ratio(span, r),
            Sampler::ParentBased(_) if span.parent_is_remote => span.sampled,
            Sampler::ParentBased(Root::AlwaysOn) => true,
            Sampler::ParentBased(Root::AlwaysOff) => false,
            Sampler::ParentBased(Root::TraceIdRatio(r)) => ratio(span, r),
        }
    }
}

/// The SDK's TraceIdRatioBased rule: the low 63 bits of the trace id
/// against `ratio * 2^63`.
fn ratio(span: &Span, r: f64) -> bool {
    let mut low = [0u8; 8];
    low.copy_from_slice(&span.trace_id.0[8..]);
    let rnd = u64::from_be_bytes(low) >> 1;
    let bound = (r.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64;
    rnd < bound
}
