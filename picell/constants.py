"""Magic numbers of the cell in one place, each with the reason it has that value.

Nothing here is computed but `NOT_INTERNET` (from the registry data below, once at start-up);
modules import these names instead of repeating literals.
"""

from __future__ import annotations

import ipaddress
import os

DEFAULT_DATA_DIR = "/var/lib/picell"  # DESIGN §9: store, rendered configs, sockets
DEFAULT_INTERFACE = "picell0"  # one WireGuard interface per cell; unique per host
DEFAULT_LISTEN_PORT = 51820  # WireGuard's customary port
DEFAULT_PAIR_PORT = 51821  # pairing listener (link issue); next to WireGuard's port
DEFAULT_MESH_PORT = 3000  # mesh API on the WireGuard address (DESIGN §1)
DEFAULT_WEB_PORT = 8080  # admin web listener on 127.0.0.1 (web issue)
DNS_PORT = 53  # the cell's Unbound on its WireGuard address

LINK_KEEPALIVE_S = 25  # keeps a site-to-site tunnel's NAT mappings open in both directions
LINK_ONLINE_S = 180  # a link is online when its last handshake is younger than this
# a link is stale with no handshake for this long: WireGuard renews a session every 120 s
# while packets flow (keepalive), so an older one means the endpoint no longer answers
LINK_STALE_S = 135
ENDPOINT_RETRY_S = 25.0  # a stale link tries its next endpoint (a name resolved anew) this often
DEVICE_KEEPALIVE_S = 25  # keeps NAT mappings of phones alive; WireGuard's usual value
ROUTE_PROTO = 77  # routing protocol id marking picell's routes (ip route … proto 77)
TABLE_NAME = "picell"  # the one nftables table picell owns (family inet)

# Where default VPN networks are drawn from, and what devices route into their tunnel so that
# networks of cells linked later are reachable without re-importing a device's config.
MESH_RANGE = ipaddress.IPv4Network("10.0.0.0/8")
# Ranges inside 10/8 that home routers, VPN products and tutorials favour: never drawn.
CROWDED_RANGES = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "10.0.0.0/16",  # home routers, the seed system's fixed 10.0.0.0/24
        "10.1.0.0/16",  # home routers
        "10.6.0.0/16",  # PiVPN
        "10.8.0.0/16",  # OpenVPN's default
        "10.10.0.0/16",  # home routers
        "10.13.13.0/24",  # linuxserver/wireguard
        "10.42.0.0/16",  # k3s pods, NetworkManager shared connections
        "10.43.0.0/16",  # k3s services
        "10.96.0.0/12",  # kubernetes services
        "10.100.0.0/16",  # home routers
        "10.244.0.0/16",  # kubernetes pods
        "10.255.0.0/16",  # broadcast-looking, avoided by habit
    )
)

# The exit relay (DESIGN §8). Each exit tunnel is a WireGuard interface of its own, nested in the
# link, numbered by a slot: 0 is the relay (our uplink lent to linked cells), 1.. the exit cells
# our devices leave through.
EXIT_MAX_SLOTS = 8  # exit cells in use at once; each costs an interface and a resolver
EXIT_MTU = 1340  # nested inside the link's WireGuard (1420) minus WireGuard's 80 bytes
EXIT_MARK_BASE = 0x5C0  # fwmark of slot k is base + k: its packets use the slot's table
EXIT_TABLE_BASE = 7700  # routing table of slot k is base + k
EXIT_RULE_PRIORITY = 7700  # after `local` (0), before `main` (32766)
EXIT_BLACKHOLE_METRIC = 4096  # an exit table's last route: without its tunnel, drop (fail closed)
EXIT_DNS_PORT_BASE = 5300  # the resolver for devices of slot k listens on our address, base + k
# What an exit lends: the internet, never a range of the IANA IPv4 Special-Purpose Address
# Registry (https://www.iana.org/assignments/iana-ipv4-special-registry/, as of 2024) nor
# multicast; the cell's own and linked networks and the host's on-link networks are added at
# run time (`state._not_internet`). Each entry: (block, the registry's name, globally reachable).
SPECIAL_PURPOSE_IPV4 = tuple(
    (ipaddress.IPv4Network(block), name, global_)
    for block, name, global_ in (
        ("0.0.0.0/8", '"This network"', False),
        ("0.0.0.0/32", '"This host on this network"', False),
        ("10.0.0.0/8", "Private-Use", False),
        ("100.64.0.0/10", "Shared Address Space", False),
        ("127.0.0.0/8", "Loopback", False),
        ("169.254.0.0/16", "Link Local", False),
        ("172.16.0.0/12", "Private-Use", False),
        ("192.0.0.0/24", "IETF Protocol Assignments", False),
        ("192.0.0.0/29", "IPv4 Service Continuity Prefix", False),
        ("192.0.0.8/32", "IPv4 dummy address", False),
        ("192.0.0.9/32", "Port Control Protocol Anycast", True),
        ("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", True),
        ("192.0.0.170/32", "NAT64/DNS64 Discovery", False),
        ("192.0.0.171/32", "NAT64/DNS64 Discovery", False),
        ("192.0.2.0/24", "Documentation (TEST-NET-1)", False),
        ("192.31.196.0/24", "AS112-v4", True),
        ("192.52.193.0/24", "AMT", True),
        ("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", False),
        ("192.88.99.2/32", "6a44-relay anycast address", False),
        ("192.168.0.0/16", "Private-Use", False),
        ("192.175.48.0/24", "Direct Delegation AS112 Service", True),
        ("198.18.0.0/15", "Benchmarking", False),
        ("198.51.100.0/24", "Documentation (TEST-NET-2)", False),
        ("203.0.113.0/24", "Documentation (TEST-NET-3)", False),
        ("240.0.0.0/4", "Reserved", False),
        ("255.255.255.255/32", "Limited Broadcast", False),
        # not in the special-purpose registry but in the multicast one: never unicast internet
        ("224.0.0.0/4", "Multicast", False),
    )
)
# RFC 5737's documentation ranges. The netns tests (and labs) build their "internet" from them,
# the only ranges a test may use as public addresses; `LAB_INTERNET_ENV` set to "1" in the
# daemon's environment makes an exit lend them, for such a lab only.
DOCUMENTATION_IPV4 = tuple(
    ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)
LAB_INTERNET_ENV = "PICELL_LAB_DOCUMENTATION_IS_INTERNET"


def not_internet(documentation_is_internet: bool = False) -> tuple[ipaddress.IPv4Network, ...]:
    """The registry's blocks (and multicast), collapsed: every entry is lent by no exit, the
    globally reachable anycast ones (AS112, AMT, PCP, TURN) too, since an exit lends browsing,
    not infrastructure services. A lab may lend the documentation ranges (see above)."""
    nets = [
        net
        for net, _, _ in SPECIAL_PURPOSE_IPV4
        if not (documentation_is_internet and net in DOCUMENTATION_IPV4)
    ]
    return tuple(ipaddress.collapse_addresses(nets))


# Computed once, when the daemon starts: the one value here that reads the environment.
NOT_INTERNET = not_internet(os.environ.get(LAB_INTERNET_ENV) == "1")

DEFAULT_INVITE_TTL_S = 24 * 3600.0  # an invite's token expires after a day unless told
INVITE_MIN_TTL_S = 60.0
INVITE_MAX_TTL_S = 30 * 24 * 3600.0
HEARTBEAT_S = 45.0  # DESIGN §6: every link's state is re-sent at least this often (<= 60 s)
# changes made within this window become one push. The owner's concurrent changes are already
# one commit (group commit), so this only gathers what other threads mark at about the same time
COALESCE_S = 0.01
DOCUMENT_COALESCE_S = 0.2  # documents from linked cells within this window: one reconcile
OUTBOX_MAX_BACKOFF_S = 30.0  # DESIGN §6: failed deliveries retry at least this often
UNLINK_GIVE_UP_S = 30 * 24 * 3600.0  # an unlink undelivered this long is dropped with our side
PAIRING_BODY_MAX = 8192  # bytes; an identity and a MAC fit many times over
PAIRING_RATE = (10, 10.0)  # requests per window (s) per source address on the pairing port
MESH_BODY_MAX = 65536  # bytes; a state document with many services
SESSION_TTL_S = 12 * 3600.0  # a web session lasts a working day, then the owner logs in again
SESSION_IDLE_S = 2 * 3600.0  # ... and ends sooner if left idle
# Failed web logins space out the next attempts (never refuse them: a tunnel hides the source,
# so any refusal would lock the owner out too): 0.5, 1, 2, 4, 8, then 10 s between attempts.
LOGIN_DELAY_BASE_S = 0.5  # the wait after the first failure
LOGIN_DELAY_MAX_S = 10.0  # ... doubling up to this: ~8,600 guesses a day at most
LOGIN_FAILURE_HALF_LIFE_S = 600.0  # recent failures count half after this long of quiet
PASSWORD_MIN_LEN = 10  # the admin password; a generated one has 96 bits

# The relay through a mutually linked cell (issue 12): the UDP ports at the relaying cell's VPN
# address that carry one pair of its linked cells to each other, derived from their keys. Above
# the usual service and exit ports, below WireGuard's customary 51820.
RELAY_PORT_BASE = 40000
RELAY_PORT_SPAN = 8192

RECONCILE_PERIOD_S = 30.0  # drift is fixed at most this long after it happens
COMMAND_TIMEOUT_S = 20.0  # no system command may hang the reconciler longer
CHILD_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)  # supervised children: restart delays

# Bounded listeners (issue 11): what one source, and all sources together, may hold open on each
# listener, and how long a connection may take to deliver a whole request (headers and body).
# Excess connections are closed at accept time: no HTTP answer, no task, no parser.
PAIRING_CONNECTIONS = (64, 4)  # (total, per source): pairing is one request per attempt
PAIRING_REQUEST_S = 5.0  # an 8 KiB body arrives in well under a second on any real link
MESH_CONNECTIONS = (128, 16)  # (total, per source): a linked cell pushes on one connection
MESH_REQUEST_S = 10.0  # through a tunnel that may be slow or lossy
WEB_CONNECTIONS = (64, 64)  # (total, per source): every browser comes from 127.0.0.1
ADMIN_CONNECTIONS = (128, 128)  # (total, per source): the unix socket's callers are root
# threads running request handlers, all listeners together (anyio's default is 40): a handler
# making a change waits for its batch's apply, and a burst of owner changes should fit in one
HANDLER_THREADS = 160
LOCAL_REQUEST_S = 30.0  # admin socket and web UI: local callers, generous
ACCEPT_BACKOFF_S = (0.05, 0.2, 1.0)  # accept() failing (EMFILE): wait, then try again
ADMIN_BODY_MAX = 1 << 20  # bytes; admin and web JSON bodies (a form or a service list)
JSON_MAX_DEPTH = 32  # nesting of any JSON body; our deepest message nests about 5 levels
REPEAT_LOG_INTERVAL_S = 10.0  # an event repeating faster is logged once per interval, counted
THREAD_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)  # a daemon thread's step that raised: wait, go on

# /metrics (issue 14): the owner's own devices scrape the cell's WireGuard address on a listener
# of its own (never the mesh listener, whose routes and firewall rule are for linked cells).
METRICS_PORT = 9469  # in the 9xxx range Prometheus exporters use; our own network only
METRICS_CONNECTIONS = (16, 4)  # (total, per source): a scraper holds one connection
METRICS_REQUEST_S = 10.0  # through the tunnel, like the mesh listener
METRICS_TOKEN_FILE = "metrics-token.sha256"  # in the data dir, 0600: the token's hash only
BACKEND_CHECK_S = 1.0  # a scrape's TCP connect check of all backends together, at most
