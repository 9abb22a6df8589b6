//! `xlb uninstall`: removes what xlb wrote. On the node: the VIPs' routes, then every
//! pin (maps and links, so the XDP and TC programs detach), as `xlb detach`, then the
//! managed neighbour entries the agent made (`ip neigh show proto 248`). With
//! `--kubernetes`, in the cluster: the addresses xlb wrote into its Services'
//! `status.loadBalancer.ingress`, the Events it recorded, and its per-VIP Leases.
//! Each step says what it removed; a second run finds nothing and succeeds.

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Service, events::v1::Event as K8sEvent};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams},
    Api, Client, ResourceExt,
};

use crate::{
    cli::UninstallArgs,
    k8s::{lease::LABEL as LEASE_LABEL, translate, REPORTING_CONTROLLER},
};

/// How long `xlb uninstall` waits for the API server's answer to one request.
const API_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn run(args: UninstallArgs) -> Result<()> {
    // The cluster first: with the Services' status cleared, nothing points clients at
    // this node's VIPs any more when its datapath goes.
    if args.kubernetes {
        let mut config = kube::Config::infer()
            .await
            .context("connecting to Kubernetes (no in-cluster config, and KUBECONFIG or ~/.kube/config gave none that works)")?;
        // Plain requests only (no watch): one the server never answers fails the
        // uninstall with a reason, instead of hanging it (kube sets no read timeout).
        config.read_timeout = Some(API_READ_TIMEOUT);
        let client = Client::try_from(config).context("connecting to Kubernetes")?;
        let opts = translate::Options {
            class: args.served.lb_class.clone(),
            default_class: args.served.default_class,
            node_name: None,
            pools: Vec::new(),
            cluster_forwarding: Default::default(),
        };
        clear_status(&client, &opts).await?;
        delete_events(&client).await?;
        delete_leases(&client, &args.served.lease_namespace).await?;
    }
    // Nothing pinned: this node holds nothing of xlb's (already uninstalled).
    if args.pin_path.exists() {
        detach_node(&args.pin_path, args.force).await?;
    }
    // The next hops the agent kept resolved (managed entries, protocol 248), in this
    // network namespace; after the datapath, which no longer needs them.
    let hops = crate::nexthop::NextHops::new()?;
    for (ifindex, addr) in hops.remove_all_ours().await? {
        crate::outln!(
            "removed neighbour entry {addr} dev {} (proto {})",
            ifname(ifindex),
            crate::nexthop::RTPROT_XLB
        );
    }
    Ok(())
}

/// The interface's name, or its index when it has none any more.
fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("#{ifindex}");
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// What `xlb detach` does: withdraws the VIPs' routes, then removes every pin.
/// Refused while an agent runs on `pin_path` (it holds the directory's lock, as for a
/// second `xlb run`), unless `force`: its XDP program would stay attached with its maps
/// gone, `xlb status` would fail, and the agent would only notice when it exits.
pub async fn detach_node(pin_path: &Path, force: bool) -> Result<()> {
    // Held until the pins are gone, so that no agent starts on them meanwhile.
    let _lock = if pin_path.is_dir() {
        match crate::dataplane::try_lock_pin_path(pin_path)? {
            Ok(lock) => Some(lock),
            Err(who) if force => {
                tracing::warn!(
                    "an xlb agent runs on {}: {who}; removing its pins anyway (--force)",
                    pin_path.display()
                );
                None
            }
            Err(who) => bail!(
                "an xlb agent runs on {}: {who}. Removing its pins would leave its XDP program attached with its maps gone; stop it first, or pass --force to remove them anyway",
                pin_path.display()
            ),
        }
    } else {
        None
    };
    // The routes first: the VIPs are read from the service map that goes next.
    let vips = crate::status::read_services(pin_path)
        .map(|s| {
            s.iter()
                .filter_map(|s| s.vip.parse().ok())
                .collect::<BTreeSet<IpAddr>>()
        })
        .unwrap_or_default();
    let withdrawn = crate::announce::withdraw_everywhere(&vips).await?;
    if withdrawn > 0 {
        crate::outln!("withdrew {withdrawn} VIP routes");
    }
    for name in crate::dataplane::detach_all(pin_path)? {
        crate::outln!("removed {name}");
    }
    Ok(())
}

async fn clear_status(client: &Client, opts: &translate::Options) -> Result<()> {
    let all: Api<Service> = Api::all(client.clone());
    for svc in all
        .list(&ListParams::default())
        .await
        .context("listing Services")?
    {
        if !translate::is_ours(&svc, opts) {
            continue;
        }
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .map(|i| i.iter().filter_map(|e| e.ip.clone()).collect::<Vec<_>>())
            .unwrap_or_default();
        if ingress.is_empty() {
            continue;
        }
        let ns = svc.namespace().unwrap_or_default();
        let api: Api<Service> = Api::namespaced(client.clone(), &ns);
        // A merge patch with null removes the list: the Service is pending again, as
        // before any balancer served it.
        let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": null}}});
        api.patch_status(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("clearing the status of Service {ns}/{}", svc.name_any()))?;
        crate::outln!(
            "cleared status.loadBalancer.ingress of Service {ns}/{} ({})",
            svc.name_any(),
            ingress.join(", ")
        );
    }
    Ok(())
}

async fn delete_events(client: &Client) -> Result<()> {
    let all: Api<K8sEvent> = Api::all(client.clone());
    let params =
        ListParams::default().fields(&format!("reportingController={REPORTING_CONTROLLER}"));
    let events = all.list(&params).await.context("listing Events")?;
    for ev in events {
        // The field selector is the server's filter; this is ours.
        if ev.reporting_controller.as_deref() != Some(REPORTING_CONTROLLER) {
            continue;
        }
        let ns = ev.namespace().unwrap_or_default();
        let api: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
        match api.delete(&ev.name_any(), &DeleteParams::default()).await {
            Ok(_) => {}
            // Expired (Events have a TTL) between the list and the delete.
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("deleting Event {ns}/{}", ev.name_any()))
            }
        }
        let regarding = ev
            .regarding
            .as_ref()
            .map(|r| {
                format!(
                    " on {} {}",
                    r.kind.clone().unwrap_or_default(),
                    r.name.clone().unwrap_or_default()
                )
            })
            .unwrap_or_default();
        crate::outln!(
            "deleted Event {ns}/{} ({}{regarding})",
            ev.name_any(),
            ev.reason.clone().unwrap_or_default()
        );
    }
    Ok(())
}

async fn delete_leases(client: &Client, namespace: &str) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let (k, v) = LEASE_LABEL;
    let leases = api
        .list(&ListParams::default().labels(&format!("{k}={v}")))
        .await
        .with_context(|| format!("listing Leases in {namespace}"))?;
    for lease in leases {
        if lease.labels().get(k).map(String::as_str) != Some(v) {
            continue;
        }
        match api
            .delete(&lease.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => crate::outln!("deleted Lease {namespace}/{}", lease.name_any()),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("deleting Lease {namespace}/{}", lease.name_any()))
            }
        }
    }
    Ok(())
}
