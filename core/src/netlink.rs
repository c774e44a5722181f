//! Small rtnetlink primitives shared by every crate that touches links (core's datapath and
//! overlay, the gateway): they return rtnetlink's own error so each caller wraps it in its
//! typed error with its own context.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::LinkMessage;
use rtnetlink::Handle;

/// The errno a netlink request failed with, if the kernel sent one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// True when the kernel answered `err`.
pub fn is_errno(e: &rtnetlink::Error, err: nix::errno::Errno) -> bool {
    errno(e) == Some(err as i32)
}

/// The link called `name` in the handle's netns; `None` if there is none.
pub async fn find_link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l),
        Err(e) if is_errno(&e, nix::errno::Errno::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes the link called `name`; a link that is not there (or vanishes meanwhile) is fine.
pub async fn delete_link(h: &Handle, name: &str) -> Result<(), rtnetlink::Error> {
    let Some(l) = find_link(h, name).await? else {
        return Ok(());
    };
    match h.link().del(l.header.index).execute().await {
        Err(e) if !is_errno(&e, nix::errno::Errno::ENODEV) => Err(e),
        _ => Ok(()),
    }
}

/// Every address on link `index`, as the kernel reports it (the messages delete them too).
pub async fn link_addresses(
    h: &Handle,
    index: u32,
) -> Result<Vec<AddressMessage>, rtnetlink::Error> {
    h.address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
}

/// The address an address message carries.
pub fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })
}
