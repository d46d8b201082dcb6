"""Magic numbers of the cell in one place, each with the reason it has that value.

Nothing here is computed; modules import these names instead of repeating literals.
"""

from __future__ import annotations

import ipaddress

DEFAULT_DATA_DIR = "/var/lib/picell"  # DESIGN §9: store, rendered configs, sockets
DEFAULT_INTERFACE = "picell0"  # one WireGuard interface per cell; unique per host
DEFAULT_LISTEN_PORT = 51820  # WireGuard's customary port
DEFAULT_PAIR_PORT = 51821  # pairing listener (link issue); next to WireGuard's port
DEFAULT_MESH_PORT = 3000  # mesh API on the WireGuard address (DESIGN §1)
DEFAULT_WEB_PORT = 8080  # admin web listener on 127.0.0.1 (web issue)
DNS_PORT = 53  # the cell's Unbound on its WireGuard address

LINK_KEEPALIVE_S = 25  # keeps a site-to-site tunnel's NAT mappings open in both directions
LINK_ONLINE_S = 180  # a link is online when its last handshake is younger than this
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
# What an exit lends: the internet, never these (private, shared, loopback, link-local,
# multicast and reserved ranges); the host's own on-link networks are added at run time.
NOT_INTERNET = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)

DEFAULT_INVITE_TTL_S = 24 * 3600.0  # an invite's token expires after a day unless told
INVITE_MIN_TTL_S = 60.0
INVITE_MAX_TTL_S = 30 * 24 * 3600.0
HEARTBEAT_S = 45.0  # DESIGN §6: every link's state is re-sent at least this often (<= 60 s)
COALESCE_S = 0.05  # a burst of sharing changes within this window becomes one push
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

RECONCILE_PERIOD_S = 30.0  # drift is fixed at most this long after it happens
COMMAND_TIMEOUT_S = 20.0  # no system command may hang the reconciler longer
CHILD_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)  # supervised children: restart delays
