//! Which requests' spans are recorded: the OpenTelemetry samplers named by
//! `OTEL_TRACES_SAMPLER` (`always_on`, `always_off`, `traceidratio` and
//! their `parentbased_` forms), decided once per request from its trace id
//! and its caller's sampled flag.

/// A sampler, as `trace_sampler` / `OTEL_TRACES_SAMPLER` name it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// What decides for a request that arrives without a trace.
    root: Root,
    /// A caller's sampled flag decides when it sent one.
    parent_based: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Root {
    AlwaysOn,
    AlwaysOff,
    /// Sampled when the trace id's random bits fall below this bound.
    Ratio {
        ratio: f64,
        bound: u64,
    },
}

impl Sampler {
    /// Parses a sampler's name and its argument (the ratio of the
    /// `traceidratio` ones, 1.0 when absent), as the specification's
    /// environment variables write them.
    pub fn parse(name: &str, argument: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<Root, String> {
            let ratio = match argument.map(str::trim) {
                None | Some("") => 1.0,
                Some(text) => text
                    .parse::<f64>()
                    .ok()
                    .filter(|ratio| (0.0..=1.0).contains(ratio))
                    .ok_or_else(|| format!("{text:?} is not a ratio from 0 to 1"))?,
            };
            Ok(Root::Ratio {
                ratio,
                // As the OpenTelemetry SDKs compute it: the trace id's last
                // 63 random bits against ratio × 2^63.
                bound: (ratio * (1u64 << 63) as f64) as u64,
            })
        };
        let (root, parent_based) = match name.trim() {
            "always_on" => (Root::AlwaysOn, false),
            "always_off" => (Root::AlwaysOff, false),
            "traceidratio" => (ratio()?, false),
            "parentbased_always_on" => (Root::AlwaysOn, true),
            "parentbased_always_off" => (Root::AlwaysOff, true),
            "parentbased_traceidratio" => (ratio()?, true),
            other => {
                return Err(format!(
                    "{other:?} is not a sampler: always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ))
            }
        };
        Ok(Self { root, parent_based })
    }

    /// Whether the span of a request in trace `trace_id` is recorded;
    /// `parent_sampled` is the caller's flag when it sent a trace context.
    pub fn sampled(&self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        if let (true, Some(parent_sampled)) = (self.parent_based, parent_sampled) {
            return parent_sampled;
        }
        match self.root {
            Root::AlwaysOn => true,
            Root::AlwaysOff => false,
            Root::Ratio { bound, .. } => {
                let random = u64::from_be_bytes(trace_id[8..].try_into().unwrap_or_default());
                (random >> 1) < bound
            }
        }
    }

    /// The name and argument, for the startup line.
    pub fn describe(&self) -> String {
        let prefix = if self.parent_based {
            "parentbased_"
        } else {
            ""
        };
        match self.root {
            Root::AlwaysOn => format!("{prefix}always_on"),
            Root::AlwaysOff => format!("{prefix}always_off"),
            Root::Ratio { ratio, .. } => format!("{prefix}traceidratio {ratio}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16 random bytes, as trace ids are.
    fn random_id() -> [u8; 16] {
        use std::hash::{BuildHasher, RandomState};
        let state = RandomState::new();
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&state.hash_one(0u8).to_be_bytes());
        id
    }

    #[test]
    fn parent_based_follows_the_caller() {
        let sampler = Sampler::parse("parentbased_always_off", None).expect("valid");
        assert!(sampler.sampled(&[7; 16], Some(true)));
        assert!(!sampler.sampled(&[7; 16], None));
        let sampler = Sampler::parse("always_on", None).expect("valid");
        assert!(sampler.sampled(&[7; 16], Some(false)));
    }

    #[test]
    fn a_ratio_samples_about_that_share() {
        let sampler = Sampler::parse("traceidratio", Some("0.25")).expect("valid");
        let sampled = (0..4000)
            .filter(|_| sampler.sampled(&random_id(), None))
            .count();
        assert!((800..1200).contains(&sampled), "{sampled} of 4000");
        let none = Sampler::parse("traceidratio", Some("0")).expect("valid");
        assert!(!(0..100).any(|_| none.sampled(&random_id(), None)));
    }

    #[test]
    fn refuses_unknown_names_and_ratios() {
        assert!(Sampler::parse("sometimes", None).is_err());
        assert!(Sampler::parse("traceidratio", Some("1.5")).is_err());
        assert!(Sampler::parse("traceidratio", Some("half")).is_err());
    }
}
