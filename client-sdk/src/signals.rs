//! Interaction events and how they become implicit feedback: weights per event kind and time decay.
//!
//! An [`Event`] is one thing the user did with one item. [`implicit_ratings`] turns a log of
//! them into one [`Rating`] per item, the strength the implicit-feedback objective trains on:
//!
//! `strength(item) = Σ w(kind) · value · 0.5^(age / half_life)`
//!
//! over the item's events, where `age = now − timestamp` (clamped at 0: an event stamped in
//! the future counts as happening now, never more than that). The clock is an argument, so
//! the function is pure and testable.

use std::time::Duration;

use fedrec_shared::Rating;

/// What the user did with an item. The numeric codes ([`EventKind::code`]) are stable: the
/// store and the C ABI use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// The item was shown or opened (code 0). `value` is typically 1, or a watched fraction.
    View,
    /// The user clicked or tapped the item (code 1).
    Click,
    /// The user bought the item (code 2).
    Purchase,
    /// The user rated the item (code 3); `value` is the rating, e.g. 1–5 stars.
    Rating,
    /// An app-defined kind (code `256 + n`), weighted by [`Weights::custom`].
    Custom(u8),
}

impl EventKind {
    /// The stable numeric code: View 0, Click 1, Purchase 2, Rating 3, Custom(n) 256 + n.
    pub fn code(self) -> u32 {
        match self {
            EventKind::View => 0,
            EventKind::Click => 1,
            EventKind::Purchase => 2,
            EventKind::Rating => 3,
            EventKind::Custom(n) => 256 + u32::from(n),
        }
    }

    /// The kind with this code, if there is one.
    pub fn from_code(code: u32) -> Option<EventKind> {
        match code {
            0 => Some(EventKind::View),
            1 => Some(EventKind::Click),
            2 => Some(EventKind::Purchase),
            3 => Some(EventKind::Rating),
            256..=511 => u8::try_from(code - 256).ok().map(EventKind::Custom),
            _ => None,
        }
    }

    /// A short lowercase name (`view`, `click`, `purchase`, `rating`, `custom`).
    pub fn name(self) -> &'static str {
        match self {
            EventKind::View => "view",
            EventKind::Click => "click",
            EventKind::Purchase => "purchase",
            EventKind::Rating => "rating",
            EventKind::Custom(_) => "custom",
        }
    }
}

/// One interaction: who did what is implicit (this device's user), so an event is only the
/// item, the kind, a value and when.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    /// Item index in the global catalogue.
    pub item: u32,
    /// What happened.
    pub kind: EventKind,
    /// How much: 1 for a plain view or click, the rating for [`EventKind::Rating`]. Must be
    /// finite and in `0..=`[`MAX_EVENT_VALUE`].
    pub value: f32,
    /// When, in seconds since the Unix epoch.
    pub timestamp_s: i64,
}

/// The largest accepted [`Event::value`]; bigger values are refused rather than allowed to
/// dominate (or overflow) an item's strength.
pub const MAX_EVENT_VALUE: f32 = 1.0e6;

impl Event {
    /// Checks the value is finite and in `0..=MAX_EVENT_VALUE`. The message names the field,
    /// never the value.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !self.value.is_finite() {
            return Err("event value must be finite");
        }
        if !(0.0..=MAX_EVENT_VALUE).contains(&self.value) {
            return Err("event value must be in 0..=1e6");
        }
        Ok(())
    }
}

/// The weight of each event kind in an item's strength.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Weight of [`EventKind::View`].
    pub view: f32,
    /// Weight of [`EventKind::Click`].
    pub click: f32,
    /// Weight of [`EventKind::Purchase`].
    pub purchase: f32,
    /// Weight of [`EventKind::Rating`] (multiplies the rating value).
    pub rating: f32,
    /// Weight of every [`EventKind::Custom`] kind.
    pub custom: f32,
}

impl Default for Weights {
    /// View 1, click 2, purchase 8, rating 1 per star, custom 1: stronger commitment counts more.
    fn default() -> Self {
        Self { view: 1.0, click: 2.0, purchase: 8.0, rating: 1.0, custom: 1.0 }
    }
}

impl Weights {
    /// The weight of `kind`.
    pub fn of(&self, kind: EventKind) -> f32 {
        match kind {
            EventKind::View => self.view,
            EventKind::Click => self.click,
            EventKind::Purchase => self.purchase,
            EventKind::Rating => self.rating,
            EventKind::Custom(_) => self.custom,
        }
    }
}

/// How events become implicit feedback.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalConfig {
    /// After this long an event counts half as much (must be at least one second).
    pub half_life: Duration,
    /// Weight per event kind (each finite and ≥ 0).
    pub weights: Weights,
}

impl Default for SignalConfig {
    /// A 30-day half-life and the default [`Weights`].
    fn default() -> Self {
        Self { half_life: Duration::from_secs(30 * 24 * 3600), weights: Weights::default() }
    }
}

impl SignalConfig {
    /// Checks the half-life is at least a second and every weight finite and non-negative.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.half_life < Duration::from_secs(1) {
            return Err("signals.half_life must be at least one second");
        }
        let w = &self.weights;
        if [w.view, w.click, w.purchase, w.rating, w.custom].iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err("signals.weights must be finite and >= 0");
        }
        Ok(())
    }

    /// The decay factor `0.5^(age / half_life)` of an event at `timestamp_s` seen at `now_s`;
    /// 1 for events in the future.
    pub fn decay(&self, timestamp_s: i64, now_s: i64) -> f64 {
        let age = now_s.saturating_sub(timestamp_s).max(0) as f64;
        0.5f64.powf(age / self.half_life.as_secs_f64())
    }
}

/// One [`Rating`] per item that has at least one event, sorted by item: the summed decayed,
/// weighted values of its events (see the module docs). Items whose events have all decayed
/// (or weigh 0) keep a strength of 0: they were still consumed.
pub fn implicit_ratings(events: &[Event], now_s: i64, cfg: &SignalConfig) -> Vec<Rating> {
    let mut by_item: Vec<(u32, f64)> = events
        .iter()
        .map(|e| {
            let w = f64::from(cfg.weights.of(e.kind)) * f64::from(e.value) * cfg.decay(e.timestamp_s, now_s);
            // Values are validated at record time; a stray NaN must not poison the sum.
            (e.item, if w.is_finite() && w > 0.0 { w } else { 0.0 })
        })
        .collect();
    by_item.sort_unstable_by_key(|&(item, _)| item);
    let mut out: Vec<Rating> = Vec::new();
    for (item, w) in by_item {
        match out.last_mut() {
            Some(r) if r.item == item => r.value = (f64::from(r.value) + w).min(f64::from(f32::MAX)) as f32,
            _ => out.push(Rating { item, value: w.min(f64::from(f32::MAX)) as f32 }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 3600;

    fn cfg() -> SignalConfig {
        SignalConfig { half_life: Duration::from_secs(10 * DAY as u64), weights: Weights::default() }
    }

    fn ev(item: u32, kind: EventKind, value: f32, timestamp_s: i64) -> Event {
        Event { item, kind, value, timestamp_s }
    }

    #[test]
    fn decay_halves_at_one_half_life() {
        let now = 1_700_000_000;
        let fresh = implicit_ratings(&[ev(1, EventKind::View, 1.0, now)], now, &cfg());
        let aged = implicit_ratings(&[ev(1, EventKind::View, 1.0, now - 10 * DAY)], now, &cfg());
        let twice = implicit_ratings(&[ev(1, EventKind::View, 1.0, now - 20 * DAY)], now, &cfg());
        assert!((fresh[0].value - 1.0).abs() < 1e-6);
        assert!((aged[0].value - 0.5).abs() < 1e-6);
        assert!((twice[0].value - 0.25).abs() < 1e-6);
    }

    #[test]
    fn recent_beats_old_for_the_same_kind() {
        let now = 1_700_000_000;
        let events = [ev(1, EventKind::Click, 1.0, now - 30 * DAY), ev(2, EventKind::Click, 1.0, now - DAY)];
        let r = implicit_ratings(&events, now, &cfg());
        assert_eq!(r.iter().map(|r| r.item).collect::<Vec<_>>(), [1, 2]);
        assert!(r[1].value > r[0].value);
    }

    #[test]
    fn weights_per_kind_scale_the_strength_and_events_sum_per_item() {
        let now = 1_700_000_000;
        let events = [
            ev(3, EventKind::View, 1.0, now),
            ev(3, EventKind::Purchase, 1.0, now),
            ev(4, EventKind::Rating, 4.0, now),
            ev(5, EventKind::Custom(7), 2.0, now),
        ];
        let r = implicit_ratings(&events, now, &cfg());
        assert_eq!(r.len(), 3);
        assert!((r[0].value - 9.0).abs() < 1e-6, "view 1 + purchase 8");
        assert!((r[1].value - 4.0).abs() < 1e-6, "rating 1 per star");
        assert!((r[2].value - 2.0).abs() < 1e-6);
    }

    #[test]
    fn future_timestamps_count_as_now_not_more() {
        let now = 1_700_000_000;
        let r = implicit_ratings(&[ev(1, EventKind::View, 1.0, now + 365 * DAY)], now, &cfg());
        assert!((r[0].value - 1.0).abs() < 1e-6);
        let r = implicit_ratings(&[ev(1, EventKind::View, 1.0, i64::MAX)], i64::MIN, &cfg());
        assert!((r[0].value - 1.0).abs() < 1e-6);
    }

    #[test]
    fn ancient_events_still_mark_the_item_consumed() {
        let r = implicit_ratings(&[ev(9, EventKind::View, 1.0, i64::MIN)], i64::MAX, &cfg());
        assert_eq!(r, [Rating { item: 9, value: 0.0 }]);
    }

    #[test]
    fn nan_negative_and_huge_values_are_refused() {
        for v in [f32::NAN, f32::INFINITY, -1.0, 2.0e6] {
            assert!(ev(1, EventKind::View, v, 0).validate().is_err(), "{v}");
        }
        assert!(ev(1, EventKind::View, 0.0, 0).validate().is_ok());
    }

    #[test]
    fn config_validation() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.half_life = Duration::ZERO;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.weights.click = f32::NAN;
        assert!(c.validate().is_err());
    }

    #[test]
    fn kind_codes_round_trip() {
        for k in
            [EventKind::View, EventKind::Click, EventKind::Purchase, EventKind::Rating, EventKind::Custom(0)]
                .into_iter()
                .chain((0..=255).map(EventKind::Custom))
        {
            assert_eq!(EventKind::from_code(k.code()), Some(k));
        }
        assert_eq!(EventKind::from_code(4), None);
        assert_eq!(EventKind::from_code(512), None);
    }
}
