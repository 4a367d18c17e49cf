# From outside: the real binary's `billsync run` at its defaults (fast schedule
# only, from the lab config) against the bench emulators with N accounts;
# VMS requests and detail reads counted by the emulators over M minutes
# after the initial sync.
import json, subprocess, sys, time
emu_bin, billsync, n, minutes = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
emu = subprocess.Popen([emu_bin, n], env={"BILLSYNC_BENCH_ROLE": "emulators", "PATH": "/usr/bin:/bin"},
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
config = emu.stdout.readline().strip()
def stats():
    emu.stdin.write("stats\n"); emu.stdin.flush()
    return json.loads(emu.stdout.readline())
d = subprocess.Popen([billsync, "--config", config, "run"], stderr=subprocess.DEVNULL)
# The initial sync: wait until the VMS count stops moving for 10 s.
last, still = -1, 0
while still < 10:
    time.sleep(1)
    s = stats()
    still = still + 1 if s["vms"] == last else 0
    last = s["vms"]
start = stats()
print("after the initial sync:", start, flush=True)
time.sleep(minutes * 60)
end = stats()
print(f"{minutes} min later:", end)
print("VMS requests:", end["vms"] - start["vms"], " detail reads:", end["details"] - start["details"])
d.terminate(); d.wait()
emu.stdin.write("quit\n"); emu.stdin.flush(); emu.wait()
