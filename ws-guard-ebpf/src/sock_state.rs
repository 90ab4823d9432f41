//! `sock:inet_sock_set_state`: the kernel's own view of each TCP socket's life. A server socket
//! reports the server as source (`saddr`, `sport`) and the client as destination.

use aya_ebpf::programs::TracePointContext;
use ws_guard_common::{key::normalize, maps::FlowKey, tracepoint as tp};

use crate::accounting;

#[inline(always)]
pub fn handle(ctx: &TracePointContext) {
    let _ = try_handle(ctx);
}

#[inline(always)]
fn try_handle(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offsets of the tracepoint's format, checked by userspace against tracefs.
    unsafe {
        let protocol: u16 = ctx.read_at(tp::PROTOCOL)?;
        if protocol != tp::IPPROTO_TCP {
            return Ok(());
        }
        let old: i32 = ctx.read_at(tp::OLDSTATE)?;
        let new: i32 = ctx.read_at(tp::NEWSTATE)?;
        let transition = tp::transition(old, new);
        if transition == tp::Transition::Other {
            return Ok(());
        }
        let family: u16 = ctx.read_at(tp::FAMILY)?;
        let (fam, server) = normalize(family, ctx.read_at(tp::SADDR)?, ctx.read_at(tp::SADDR_V6)?);
        let (_, client) = normalize(family, ctx.read_at(tp::DADDR)?, ctx.read_at(tp::DADDR_V6)?);
        let flow = FlowKey {
            client,
            server,
            client_port: ctx.read_at(tp::DPORT)?,
            server_port: ctx.read_at(tp::SPORT)?,
            family: fam,
            _pad: 0,
        };
        match transition {
            tp::Transition::Established => accounting::established(&flow),
            tp::Transition::Closed => accounting::closed(&flow),
            tp::Transition::Other => {}
        }
    }
    Ok(())
}
