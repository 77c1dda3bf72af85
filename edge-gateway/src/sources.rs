//! Limits per source address, so that one address cannot take the pod.
//!
//! Before authentication a connection costs the pod a slot and, once its token is read,
//! the platform a config call. Per client address (the PROXY header's when enabled):
//! - at most `--max-connections-per-source` open connections;
//! - at most `--auth-rate-per-source` authentication attempts per second (burst
//!   `--auth-burst-per-source`);
//! - `--ban-after` refused authentications within `--ban-window` ban the address for
//!   `--ban-for`: its connections are refused at once, and cost nothing.
//!
//! Entries live while the address has connections, a ban, recent failures or a spent
//! budget; [`SourceLimits::sweep`] drops the rest, so the table is bounded by the
//! addresses active in the last ban window.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;
use tracing::warn;

use crate::metrics::ReasonLabel;
use crate::session::rate::{RateBudget, RateLimit};

/// The per-source limits (flags; see the crate README).
#[derive(Clone, Copy, Debug)]
pub struct SourcePolicy {
    pub max_connections: u32,
    pub auth_rate: RateLimit,
    pub ban_after: u32,
    pub ban_window: Duration,
    pub ban_for: Duration,
}

/// Why a source's connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Connections,
    AuthRate,
    Banned,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Connections => "source_connections",
            Refusal::AuthRate => "source_auth_rate",
            Refusal::Banned => "source_banned",
        }
    }

    /// What the device reads.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Connections => "too many connections from this address",
            Refusal::AuthRate => "too many authentication attempts from this address, retry later",
            Refusal::Banned => "too many failed authentications from this address, retry later",
        }
    }
}

struct Source {
    connections: u32,
    attempts: RateBudget,
    failures: u32,
    failures_since: Instant,
    banned_until: Option<Instant>,
}

/// The limits of every source address of the pod.
pub struct SourceLimits {
    policy: SourcePolicy,
    sources: Mutex<HashMap<IpAddr, Source>>,
    refused: Family<ReasonLabel, Counter>,
}

impl SourceLimits {
    pub fn new(policy: SourcePolicy, refused: Family<ReasonLabel, Counter>) -> Self {
        SourceLimits { policy, sources: Mutex::default(), refused }
    }

    fn with<T>(&self, ip: IpAddr, f: impl FnOnce(&mut Source, &SourcePolicy) -> T) -> T {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let source = sources.entry(ip).or_insert_with(|| Source {
            connections: 0,
            attempts: RateBudget::new(self.policy.auth_rate),
            failures: 0,
            failures_since: Instant::now(),
            banned_until: None,
        });
        f(source, &self.policy)
    }

    fn refuse(&self, refusal: Refusal) -> Refusal {
        self.refused.get_or_create(&ReasonLabel { reason: refusal.label() }).inc();
        refusal
    }

    /// Admits one more connection of `ip`; pair with [`SourceLimits::release`].
    ///
    /// # Errors
    /// The address is banned or at its connection limit.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Refusal> {
        let admitted = self.with(ip, |source, policy| {
            if source.banned_until.is_some_and(|until| until > Instant::now()) {
                return Err(Refusal::Banned);
            }
            if source.connections >= policy.max_connections {
                return Err(Refusal::Connections);
            }
            source.connections += 1;
            Ok(())
        });
        admitted.map_err(|refusal| self.refuse(refusal))
    }

    /// A connection admitted by [`SourceLimits::admit`] ended.
    pub fn release(&self, ip: IpAddr) {
        // The entry exists: a connection keeps it from the sweep.
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(source) = sources.get_mut(&ip) {
            source.connections = source.connections.saturating_sub(1);
        }
    }

    /// Takes one authentication attempt of `ip`'s budget.
    ///
    /// # Errors
    /// The address is banned or has no attempt left this second.
    pub fn attempt(&self, ip: IpAddr) -> Result<(), Refusal> {
        let attempted = self.with(ip, |source, policy| {
            if source.banned_until.is_some_and(|until| until > Instant::now()) {
                return Err(Refusal::Banned);
            }
            if !source.attempts.has_token(policy.auth_rate) {
                return Err(Refusal::AuthRate);
            }
            source.attempts.spend();
            Ok(())
        });
        attempted.map_err(|refusal| self.refuse(refusal))
    }

    /// The platform refused a token from `ip`; enough of them ban the address.
    pub fn failed(&self, ip: IpAddr) {
        let banned = self.with(ip, |source, policy| {
            let now = Instant::now();
            if now.duration_since(source.failures_since) > policy.ban_window {
                source.failures = 0;
                source.failures_since = now;
            }
            source.failures += 1;
            if source.failures < policy.ban_after {
                return false;
            }
            source.failures = 0;
            source.banned_until = Some(now + policy.ban_for);
            true
        });
        if banned {
            warn!(source = %ip, ban = ?self.policy.ban_for, "address banned after repeated failed authentications");
        }
    }

    /// Drops the entries that hold nothing: no connection, no ban, no recent failure and
    /// a full attempt budget.
    pub fn sweep(&self) {
        let now = Instant::now();
        let policy = self.policy;
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.retain(|_, source| {
            source.connections > 0
                || source.banned_until.is_some_and(|until| until > now)
                || (source.failures > 0 && now.duration_since(source.failures_since) <= policy.ban_window)
                || source.attempts.is_spent(policy.auth_rate)
        });
    }

    /// Addresses tracked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Sweeps the table every `period` until `stop`.
pub async fn sweep_periodically(
    limits: &SourceLimits,
    period: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => limits.sweep(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: SourcePolicy = SourcePolicy {
        max_connections: 2,
        auth_rate: RateLimit { per_second: 1, burst: 2 },
        ban_after: 3,
        ban_window: Duration::from_secs(60),
        ban_for: Duration::from_secs(30),
    };

    fn limits() -> SourceLimits {
        SourceLimits::new(POLICY, Family::default())
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[tokio::test(start_paused = true)]
    async fn connections_are_capped_per_address() {
        let limits = limits();
        assert_eq!(limits.admit(A), Ok(()));
        assert_eq!(limits.admit(A), Ok(()));
        assert_eq!(limits.admit(A), Err(Refusal::Connections));
        assert_eq!(limits.admit(B), Ok(()), "another address is not affected");
        limits.release(A);
        assert_eq!(limits.admit(A), Ok(()));
        assert_eq!(limits.refused.get_or_create(&ReasonLabel { reason: "source_connections" }).get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_refill_at_the_rate() {
        let limits = limits();
        assert_eq!(limits.attempt(A), Ok(()));
        assert_eq!(limits.attempt(A), Ok(()));
        assert_eq!(limits.attempt(A), Err(Refusal::AuthRate));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(limits.attempt(A), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_failures_ban_then_the_ban_expires() {
        let limits = limits();
        limits.admit(A).unwrap();
        for _ in 0..3 {
            limits.failed(A);
        }
        assert_eq!(limits.admit(A), Err(Refusal::Banned));
        assert_eq!(limits.attempt(A), Err(Refusal::Banned));
        tokio::time::sleep(POLICY.ban_for).await;
        assert_eq!(limits.admit(A), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_add_up() {
        let limits = limits();
        limits.failed(A);
        limits.failed(A);
        tokio::time::sleep(POLICY.ban_window + Duration::from_secs(1)).await;
        limits.failed(A);
        assert_eq!(limits.admit(A), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_keeps_only_what_still_counts() {
        let limits = limits();
        limits.admit(A).unwrap();
        limits.attempt(B).unwrap();
        limits.sweep();
        assert_eq!(limits.len(), 2, "A is connected, B's budget is not full");
        limits.release(A);
        tokio::time::sleep(Duration::from_secs(2)).await;
        limits.sweep();
        assert_eq!(limits.len(), 0);
    }
}
