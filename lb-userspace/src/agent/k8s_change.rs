//! A change from Kubernetes, applied at the cost of what changed: the services the
//! controller made again are checked, looked up and resolved; the others are the
//! running state's, moved into the new one as they are. (Merging, checking and
//! resolving all 1,000 services of 100 backends again took most of an EndpointSlice
//! change's time.)

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use anyhow::Result;
use tracing::debug;

use super::{Agent, RELOAD_RESOLVE_WAIT};
use crate::{
    dataplane::ApplySummary,
    health,
    model::{self, Desired},
};

impl Agent {
    /// Makes the controller's last word (`k8s_word`) the running state, against the
    /// running one (`desired`, `k8s_admitted`). Falls back on `adopt` when a service
    /// with health checks is involved. On error nothing changes.
    pub(super) async fn adopt_k8s_change(&mut self) -> Result<Option<ApplySummary>> {
        let t = std::time::Instant::now();
        let word = self.k8s_word.clone();
        let admitted = self.admitted(&self.file, &word);
        let is_new = |s: &Arc<model::Service>| {
            self.k8s_admitted
                .get(&s.name)
                .is_none_or(|o| !Arc::ptr_eq(o, s))
        };
        let names: BTreeSet<&str> = admitted.iter().map(|s| s.name.as_str()).collect();
        let checked = |s: &model::Service| s.health_check.is_some();
        if admitted.iter().filter(|s| is_new(s)).any(|s| checked(s))
            || self
                .k8s_admitted
                .values()
                .filter(|s| is_new(s) || !names.contains(s.name.as_str()))
                .any(|s| checked(s))
        {
            return self.adopt(self.file.clone(), Some(word)).await;
        }
        let Some(running) = self.desired.as_ref() else {
            return self.adopt(self.file.clone(), Some(word)).await;
        };
        let files = self.file.services.len();
        // The checks: the changed services on their own; every one against the others.
        let snat = running.settings.snat.addresses();
        let mut set = model::validate::Set::new(&snat);
        for s in &running.services[..files.min(running.services.len())] {
            set.add_checked(s)?;
        }
        for s in &admitted {
            if is_new(s) {
                set.add(s)?;
            } else {
                set.add_checked(s)?;
            }
        }
        model::check_capacity(
            files + admitted.len(),
            self.file
                .services
                .iter()
                .map(|s| s.backends.len())
                .chain(admitted.iter().map(|s| s.backends.len()))
                .sum(),
            self.file
                .services
                .iter()
                .map(|s| s.allow.len())
                .chain(admitted.iter().map(|s| s.allow.len()))
                .sum(),
            self.dp.max_services,
            self.dp.max_backends,
        )?;
        // The routes of the changed services' backends not followed yet.
        let changed: Vec<&Arc<model::Service>> = admitted.iter().filter(|s| is_new(s)).collect();
        let targets: BTreeSet<IpAddr> = changed
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.target()))
            .collect();
        self.nexthops.track(&targets, RELOAD_RESOLVE_WAIT).await;
        // The new state: the file's services and the unchanged ones moved over, the
        // changed ones resolved.
        let mut old = self.desired.take().expect("checked above");
        let mut before: BTreeMap<String, model::Service> = old
            .services
            .split_off(files.min(old.services.len()))
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let mut services = std::mem::take(&mut old.services);
        services.reserve(admitted.len());
        for s in &admitted {
            let kept = if is_new(s) {
                None
            } else {
                before.remove(&s.name)
            };
            services.push(match kept {
                Some(k) => k,
                None => {
                    let mut fresh = [(**s).clone()];
                    health::resolve(&mut fresh, &self.health);
                    self.nexthops.resolve(&mut fresh);
                    let [fresh] = fresh;
                    fresh
                }
            });
        }
        // What is left of the running state: the changed services' last versions and
        // the removed ones; their backends' routes may no longer be needed.
        let candidates: BTreeSet<IpAddr> = before
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.target()))
            .collect();
        drop(before);
        let mut desired = Desired {
            settings: old.settings,
            services,
            announce: BTreeSet::new(),
        };
        desired.announce = if self.drained {
            BTreeSet::new()
        } else {
            desired.servable_vips()
        };
        debug!(
            changed = changed.len(),
            ms = t.elapsed().as_millis() as u64,
            "Kubernetes change merged"
        );
        let t = std::time::Instant::now();
        let summary = match self.apply_maps(&desired) {
            Ok(s) => s,
            Err(e) => {
                drop(desired);
                return Err(self.rebuild_after_failed_apply(e));
            }
        };
        debug!(ms = t.elapsed().as_millis() as u64, "maps applied");
        // Routes no backend of the new state has any more: of the file (as it says
        // them: health checks leave unhealthy ones out of `desired`) or of Kubernetes.
        let mut gone = candidates;
        for s in &changed {
            for b in &s.backends {
                gone.remove(&b.target());
            }
        }
        for s in &self.file.services {
            if gone.is_empty() {
                break;
            }
            for b in &s.backends {
                gone.remove(&b.via.unwrap_or(b.address.ip()));
            }
        }
        for s in &desired.services[files.min(desired.services.len())..] {
            if gone.is_empty() {
                break;
            }
            for b in &s.backends {
                gone.remove(&b.target());
            }
        }
        self.nexthops.forget_these(&gone).await;
        self.desired = Some(desired);
        self.k8s_admitted = admitted.into_iter().map(|s| (s.name.clone(), s)).collect();
        self.k8s = Some(word);
        self.metrics.applied(true);
        Ok(Some(summary))
    }
}
