"""Redis's own CPU per room message: post_room.lua before (room channels, both workers
subscribed) and after (node channels, the caller's node skipped). Two redis-cli
subscribers stand in for the workers' pub/sub connections; one redis-py connection
stands in for the posting worker's pipeline (batches of BATCH EVALSHAs)."""
import os, subprocess, sys, time, redis

PORT = 6392
ROOMS, BOTH = 250, 195   # 195 rooms with members on both workers, 55 only on the poster's
BATCH = int(os.environ.get("BATCH", "4"))
N = int(os.environ.get("N", "40000"))

def src(tree, names):
    return "".join(open(f"{tree}/wschat/stores/redis/scripts/{n}.lua").read() for n in names)

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def run(variant):
    srv = subprocess.Popen(["redis-server", "--port", str(PORT), "--save", "", "--appendonly", "no"],
                           stdout=subprocess.DEVNULL)
    time.sleep(0.4)
    r = redis.Redis(port=PORT)
    tree = "/tmp/redisproto-micro/base" if variant == "old" else "/tmp/wt-redisproto"
    sha = r.script_load(src(tree, ["charge", "take_id", "post_room"]))
    rooms = [f"room{i:03d}" for i in range(ROOMS)]
    subs = []
    if variant == "old":
        w1 = [f"wschat:room:{x}" for x in rooms]
        w2 = [f"wschat:room:{x}" for x in rooms[:BOTH]]
    else:
        w1, w2 = ["wschat:nodech:W1"], ["wschat:nodech:W2"]
        for x in rooms[:BOTH]:
            r.sadd(f"wschat:{{r:{x}}}:nodes", "W1", "W2")
        for x in rooms[BOTH:]:
            r.sadd(f"wschat:{{r:{x}}}:nodes", "W1")
    for chans in (w1, w2):
        subs.append(subprocess.Popen(["redis-cli", "-p", str(PORT), "subscribe", *chans],
                                     stdout=subprocess.DEVNULL))
    time.sleep(0.5)
    prefix = b'{"type":"message","room":"ROOM","from":"guest-abcdef","user_id":"guest-0123456789ab","text":"' + b"x" * 120 + b'","timestamp":1764600000000,"guest":true,"id":'
    suffix = b"}"
    def call(pipe, i):
        x = rooms[i % ROOMS]
        keys = [f"wschat:{{r:{x}}}:seq", f"wschat:{{r:{x}}}:hist"]
        if variant == "old":
            keys.append(f"wschat:room:{x}")
            args = [prefix, suffix, 3600, 1764600000000, 100, 0]
        else:
            keys.append(f"wschat:{{r:{x}}}:nodes")
            args = [prefix, suffix, 3600, 1764600000000, 100, "W1", x, "wschat:nodech:", 0]
        pipe.evalsha(sha, len(keys), *keys, *args)
    # warm-up
    p = r.pipeline(transaction=False)
    for i in range(2000):
        call(p, i)
    p.execute()
    time.sleep(0.3)
    c0 = cpu(srv.pid); s0 = [cpu(s.pid) for s in subs]; t0 = time.time()
    for b in range(0, N, BATCH):
        p = r.pipeline(transaction=False)
        for i in range(b, b + BATCH):
            call(p, i)
        p.execute()
    time.sleep(0.3)
    c1 = cpu(srv.pid); s1 = [cpu(s.pid) for s in subs]; t1 = time.time()
    st = r.info("commandstats"); ev = st["cmdstat_evalsha"]; pub = st.get("cmdstat_publish", {"calls": 0})
    net = r.info("stats")["total_net_output_bytes"]
    for s in subs: s.kill()
    r.shutdown(nosave=True) if hasattr(r, "shutdown") else None
    srv.wait()
    return {"variant": variant, "redis_us_per_msg": (c1 - c0) / N * 1e6,
            "subscribers_us_per_msg": (sum(s1) - sum(s0)) / N * 1e6,
            "evalsha_usec_per_call": ev["usec_per_call"], "publish_calls_per_msg": pub["calls"] / ev["calls"],
            "net_out_bytes_per_msg": net / ev["calls"], "wall_s": t1 - t0}

if __name__ == "__main__":
    for v in sys.argv[1:]:
        print(run(v), flush=True)
