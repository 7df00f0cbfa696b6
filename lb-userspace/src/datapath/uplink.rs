//! What an interface and its namespace must offer before the TC programs attach: an
//! Ethernet header to parse, and SNAT source ports the node itself never picks.

use std::{io, os::fd::AsRawFd as _};

use anyhow::{Result, bail};

/// `--snat-ports`: the source ports of flows SNATed to the node's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnatPorts {
    pub first: u16,
    pub last: u16,
}

impl Default for SnatPorts {
    fn default() -> Self {
        Self {
            first: lb_common::DEFAULT_SNAT_PORT_MIN,
            last: 65535,
        }
    }
}

/// Fewer ports than this could not hold a busy node's flows to one backend.
const MIN_SNAT_PORTS: u32 = 1024;

impl SnatPorts {
    /// `MIN-MAX`, at least [`MIN_SNAT_PORTS`] ports, above the privileged range.
    pub fn parse(text: &str) -> Result<Self> {
        let parsed = text.split_once('-').and_then(|(a, b)| {
            Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
        });
        let Some((first, last)) = parsed else {
            bail!("--snat-ports {text:?}: expected MIN-MAX, e.g. 61000-65535");
        };
        if first < 1024 || last < first || u32::from(last - first) + 1 < MIN_SNAT_PORTS {
            bail!(
                "--snat-ports {text:?}: expected at least {MIN_SNAT_PORTS} ports between 1024 \
                 and 65535"
            );
        }
        Ok(Self { first, last })
    }

    pub fn count(&self) -> u32 {
        u32::from(self.last - self.first) + 1
    }

    /// Why these ports cannot be used where the node's own connections take their
    /// source ports from `port_range` (`net.ipv4.ip_local_port_range`) except
    /// `reserved` (`net.ipv4.ip_local_reserved_ports`), if they cannot: a SNATed
    /// flow and one of the node's own connections could then share a tuple.
    pub fn conflict(&self, port_range: &str, reserved: &str) -> Option<String> {
        let mut bounds = port_range
            .split_whitespace()
            .filter_map(|p| p.parse::<u16>().ok());
        let (low, high) = (bounds.next()?, bounds.next()?);
        let reserved = parse_port_list(reserved);
        let clashing: Vec<u16> = (self.first.max(low)..=self.last.min(high))
            .filter(|port| !reserved.iter().any(|(a, b)| (a..=b).contains(&port)))
            .collect();
        let (&first, &last) = (clashing.first()?, clashing.last()?);
        Some(format!(
            "the SNAT ports {}-{} overlap this node's ephemeral ports \
             (net.ipv4.ip_local_port_range = {low} {high}): {} of them, {first} to {last}, \
             are neither outside it nor in net.ipv4.ip_local_reserved_ports. Choose other \
             ports with --snat-ports, or shrink ip_local_port_range, or reserve them \
             (sysctl net.ipv4.ip_local_reserved_ports={}-{})",
            self.first,
            self.last,
            clashing.len(),
            self.first,
            self.last,
        ))
    }

    /// [`SnatPorts::conflict`] for the current network namespace.
    pub fn conflict_here(&self) -> Option<String> {
        let read = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"));
        let range = read("ip_local_port_range").ok()?;
        let reserved = read("ip_local_reserved_ports").unwrap_or_default();
        self.conflict(&range, &reserved)
    }
}

/// `1000,2000-2005` as inclusive ranges.
fn parse_port_list(text: &str) -> Vec<(u16, u16)> {
    text.split(',')
        .filter_map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => part.parse().ok().map(|p| (p, p)),
            }
        })
        .collect()
}

const ARPHRD_ETHER: u16 = 1;

/// The link type (`ARPHRD_*`) of `device` in the current network namespace.
fn link_type(device: &str) -> io::Result<u16> {
    let socket =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    // struct ifreq: the name, then ifr_hwaddr (a sockaddr, family first).
    let mut request = [0u8; 40];
    if device.is_empty() || device.len() >= 16 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    request[..device.len()].copy_from_slice(device.as_bytes());
    // SAFETY: SIOCGIFHWADDR reads the name and writes the address into `request`,
    // which is as large as struct ifreq.
    if unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCGIFHWADDR,
            request.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(u16::from_ne_bytes([request[16], request[17]]))
}

/// Refuses an interface whose frames do not start with an Ethernet header (a
/// WireGuard or IP tunnel, loopback): the TC programs would misread every packet.
pub fn require_ethernet(device: &str) -> Result<()> {
    match link_type(device) {
        Ok(ARPHRD_ETHER) => Ok(()),
        Ok(other) => bail!(
            "{device} is not an Ethernet interface (link type {other}): the TC programs \
             parse Ethernet frames; leave it out of --devices"
        ),
        Err(err) => bail!("reading the link type of {device}: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_ports_parse_within_bounds() {
        assert_eq!(
            SnatPorts::parse("61000-65535").unwrap(),
            SnatPorts::default()
        );
        assert_eq!(SnatPorts::default().count(), 4536);
        assert_eq!(
            SnatPorts::parse("20000-29999").unwrap(),
            SnatPorts {
                first: 20000,
                last: 29999
            }
        );
        for bad in [
            "",
            "61000",
            "65535-61000",
            "100-5000",
            "61000-61100",
            "a-b",
            "1-70000",
        ] {
            assert!(SnatPorts::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn an_overlap_with_the_ephemeral_range_is_found_unless_reserved() {
        let snat = SnatPorts::default();
        // Linux's default range ends below 61000.
        assert_eq!(snat.conflict("32768\t60999\n", ""), None);
        let why = snat.conflict("32768\t64000\n", "").unwrap();
        assert!(why.contains("3001 of them, 61000 to 64000"), "{why}");
        assert!(why.contains("ip_local_reserved_ports=61000-65535"), "{why}");
        // Reserved ports are never picked for the node's own connections.
        assert_eq!(snat.conflict("32768 64000", "61000-65535"), None);
        let why = snat.conflict("32768 64000", "80,61000-62999\n").unwrap();
        assert!(why.contains("1001 of them, 63000 to 64000"), "{why}");
        // Unreadable: nothing to say.
        assert_eq!(snat.conflict("", ""), None);
    }

    #[test]
    fn loopback_is_not_ethernet() {
        let err = require_ethernet("lo").unwrap_err().to_string();
        assert!(
            err.contains("not an Ethernet interface (link type 772)"),
            "{err}"
        );
        assert!(require_ethernet("no-such-if0").is_err());
    }
}
