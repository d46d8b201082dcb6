#!/bin/sh
# regenerate cases.json (as root): each case in a scratch namespace
set -eu
cd "$(dirname "$0")"
out=$(mktemp -d)
mkdir -p $out; rm -f $out/*
run() { ip netns exec hfwscratch "$@"; }
for case in docker docker_fixed docker_ufw ufw ufw_fixed firewalld firewalld_fixed other; do
  ip netns del hfwscratch 2>/dev/null || true; ip netns add hfwscratch
  case $case in
    docker*) run iptables-restore < docker.rules;;
    ufw*) run iptables-restore < ufw.rules;;
    firewalld*) run nft -f firewalld.nft;;
    other) run nft -f other.nft;;
  esac
  case $case in
    docker_fixed)
      for r in "-i picell0" "-o picell0" "-i picell0x+" "-o picell0x+"; do
        run iptables-nft -I DOCKER-USER $r -m comment --comment picell -j ACCEPT; done;;
    docker_ufw)
      run iptables-nft -N ufw-user-input; run iptables-nft -P INPUT DROP
      run iptables-nft -A INPUT -j ufw-user-input
      run iptables-nft -I DOCKER-USER -i picell0 -m comment --comment picell -j ACCEPT;;
    ufw_fixed)
      run iptables-nft -A ufw-user-input -i picell0 -j ACCEPT
      run iptables-nft -A ufw-user-input -p udp -m udp --dport 51820 -j ACCEPT
      run iptables-nft -A ufw-user-forward -i picell0 -j ACCEPT;;
    firewalld_fixed)
      run nft insert rule inet firewalld filter_INPUT_ZONES iifname '"picell0"' goto filter_IN_trusted
      run nft insert rule inet firewalld filter_FORWARD_ZONES iifname '"picell0"' goto filter_FWD_trusted
      run nft add rule inet firewalld filter_IN_public_allow udp dport 51820 accept;;
  esac
  run nft add table inet picell
  run nft add chain inet picell forward '{ type filter hook forward priority 0; policy accept; }'
  run nft -j list chains > $out/$case.chains
  for t in "ip filter" "inet firewalld" "inet filter" "ip libvirt"; do
    run nft -j list table $t > "$out/$case.$(echo $t | tr ' ' _)" 2>/dev/null || rm -f "$out/$case.$(echo $t | tr ' ' _)"
  done
done
ip netns del hfwscratch
python3 - "$out" <<'PY'
import glob, json, os, sys
cases = {}
for f in sorted(glob.glob(sys.argv[1] + "/*")):
    case, what = os.path.basename(f).split(".", 1)
    c = cases.setdefault(case, {"chains": None, "tables": {}})
    data = json.load(open(f))
    if what == "chains":
        c["chains"] = data
    else:
        c["tables"][what.replace("_", " ")] = data
json.dump(cases, open("cases.json", "w"), indent=1, sort_keys=True)
PY
