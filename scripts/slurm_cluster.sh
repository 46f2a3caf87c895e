#!/usr/bin/env bash
# A real single-node SLURM cluster (SLURM 22.05 from Debian bookworm) for tests and CI, as root:
#
#   scripts/slurm_cluster.sh start    # install if needed, start the daemons, wait until the node is idle
#   scripts/slurm_cluster.sh status   # each daemon's pid (or "stopped") and sinfo; exit 1 unless all run
#   scripts/slurm_cluster.sh stop     # cancel the jobs, end the daemons this script started (pid files)
#
# munged (as the munge user), MariaDB (unix socket only), slurmdbd, slurmctld and slurmd are started
# directly: no systemd, no cgroups (proctrack/linuxproc, task/none). Accounting (slurmdbd) is needed:
# submitit asks sacct about jobs that died without a result (scancel, TIMEOUT). Everything the cluster
# writes lives under $CONVNN_SLURM_DIR (default /var/lib/convnn-slurm):
#   etc/ slurm.conf, slurmdbd.conf (mode 600), my.cnf    log/ the daemons' logs    run/ their pid files
#   spool/ slurmctld's state, slurmd's spool             munge/ munged's seed      mysql/ the database
# Clients find the cluster through /etc/slurm/slurm.conf, a link to etc/slurm.conf (the script refuses to
# replace a real /etc/slurm/slurm.conf). Ports 6817 (slurmctld), 6818 (slurmd), 6819 (slurmdbd).
set -euo pipefail

STATE=${CONVNN_SLURM_DIR:-/var/lib/convnn-slurm}
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd) # start order; stop goes backwards
CLIENT_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET=/run/munge/munge.socket.2
MYSQL_SOCKET=/run/mysqld/mysqld.sock
NODE=$(hostname -s)
FRESH=0 # set by start: no daemon of the cluster was running
export SLURM_CONF=$STATE/etc/slurm.conf # slurmdbd reads slurmdbd.conf from the same directory

say() { echo "slurm_cluster: $*" >&2; }
die() {
	say "error: $*"
	exit 1
}

pid_of() { # the pid recorded for daemon $1 if that process is alive (a zombie is not), else nothing
	local file="$STATE/run/$1.pid"
	[[ -s $file ]] || return 0
	local pid
	pid=$(<"$file")
	if [[ $(ps -o stat= -p "$pid" 2>/dev/null) == [^Z]* ]]; then echo "$pid"; fi
}

running() { [[ -n $(pid_of "$1") ]]; }

install_packages() {
	local missing=()
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	say "installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

resolve_hostname() { # slurmctld and slurmd look the node's short name up
	getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts
}

write_configs() {
	mkdir -p "$STATE"/{etc,log,run,spool/ctld,spool/d,munge,mysql} /run/munge /run/mysqld /etc/slurm
	chown munge:munge "$STATE/munge" /run/munge
	chmod 700 "$STATE/munge"
	chown mysql:mysql "$STATE/mysql" /run/mysqld
	local node_line
	node_line=$(slurmd -C | head -1)
	cat >"$STATE/etc/slurm.conf" <<EOF
# Written by scripts/slurm_cluster.sh: a single-node test cluster, state under $STATE.
ClusterName=convnn
SlurmctldHost=$NODE
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# Step credentials expire after 10 s (default 120 s, which delays every requeued job by two minutes).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No systemd, no usable cgroups here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
# A job asking more than the partition or node can give fails at sbatch instead of waiting forever.
EnforcePartLimits=ALL
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=300
SchedulerType=sched/backfill
$node_line State=UNKNOWN
# Tiny test jobs share the CPUs (up to 4 jobs per CPU); a job still cannot ask more CPUs than exist.
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
	cat >"$STATE/etc/slurmdbd.conf" <<EOF
# Written by scripts/slurm_cluster.sh. MariaDB on its unix socket, root by socket authentication.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
	chmod 600 "$STATE/etc/slurmdbd.conf"
	cat >"$STATE/etc/my.cnf" <<EOF
[mysqld]
user=mysql
datadir=$STATE/mysql/data
socket=$MYSQL_SOCKET
skip-networking
log-error=$STATE/log/mariadbd.log
EOF
	if [[ -e $CLIENT_CONF && ! -L $CLIENT_CONF ]]; then
		die "$CLIENT_CONF exists and is not ours; move it away to run this test cluster"
	fi
	ln -sfn "$STATE/etc/slurm.conf" "$CLIENT_CONF"
}

wait_for() { # wait_for <what> <seconds> <command...>: poll the command until it succeeds
	local what=$1 seconds=$2
	shift 2
	for ((i = 0; i < seconds * 4; i++)); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.25
	done
	die "$what not ready after ${seconds}s; see $STATE/log/"
}

start_munged() {
	[[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
	touch "$STATE/log/munged.log"
	chown munge:munge "$STATE/log/munged.log"
	runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$STATE/munge/munged.pid" \
		--log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
	wait_for munged 10 test -s "$STATE/munge/munged.pid"
	cp "$STATE/munge/munged.pid" "$STATE/run/munged.pid"
	wait_for munged 10 munge -n -s "$MUNGE_SOCKET"
}

start_mariadbd() {
	if [[ ! -d $STATE/mysql/data/mysql ]]; then
		mariadb-install-db --defaults-file="$STATE/etc/my.cnf" --auth-root-authentication-method=socket \
			--skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
	fi
	touch "$STATE/log/mariadbd.log"
	chown mysql:mysql "$STATE/log/mariadbd.log"
	setsid mariadbd --defaults-file="$STATE/etc/my.cnf" --pid-file="$STATE/mysql/mariadbd.pid" \
		</dev/null >/dev/null 2>&1 &
	wait_for mariadbd 30 mariadb --socket="$MYSQL_SOCKET" -e "select 1"
	cp "$STATE/mysql/mariadbd.pid" "$STATE/run/mariadbd.pid"
}

start_slurmdbd() {
	slurmdbd
	wait_for slurmdbd 30 sacctmgr -n list cluster
}

start_slurmctld() { # -c: a cluster started afresh drops the jobs a killed one left in its saved state
	if ((FRESH)); then slurmctld -c; else slurmctld; fi
	wait_for slurmctld 30 scontrol ping
}

start_slurmd() { # its pid file first names the process that forks the daemon
	slurmd
	wait_for slurmd 10 running slurmd
}

node_idle() { [[ $(sinfo -h -n "$NODE" -o %T) == idle* ]]; }

start() {
	[[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts system daemons)"
	local up=0
	for d in "${DAEMONS[@]}"; do running "$d" && up=$((up + 1)); done
	if ((up == ${#DAEMONS[@]})); then
		say "already running (node $NODE $(sinfo -h -n "$NODE" -o %T))"
		return 0
	fi
	install_packages
	resolve_hostname
	FRESH=$((up == 0))
	if ((FRESH)); then
		write_configs
		say "starting afresh: jobs left by a cluster that was not stopped are dropped"
	fi
	for d in "${DAEMONS[@]}"; do
		if ! running "$d"; then
			"start_$d"
			say "$d started (pid $(pid_of "$d"))"
		fi
	done
	if ! sacctmgr -n list cluster format=cluster | grep -qw convnn; then
		sacctmgr -i add cluster convnn >/dev/null
	fi
	wait_for "node $NODE" 60 node_idle
	say "up: node $NODE idle, state in $STATE"
}

stop() {
	if [[ -n $(pid_of slurmctld) ]]; then
		squeue -h -o %A | sort -u | xargs -r scancel
		for ((i = 0; i < 60; i++)); do
			[[ -z $(squeue -h -o %A) ]] && break
			sleep 0.5
		done
	fi
	for ((j = ${#DAEMONS[@]} - 1; j >= 0; j--)); do
		local d=${DAEMONS[j]} pid
		pid=$(pid_of "$d")
		[[ -n $pid ]] || continue
		kill "$pid"
		for ((i = 0; i < 120; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.25
		done
		if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
		rm -f "$STATE/run/$d.pid"
		say "$d stopped (pid $pid)"
	done
}

status() {
	local down=0
	for d in "${DAEMONS[@]}"; do
		local pid
		pid=$(pid_of "$d")
		echo "$d: ${pid:-stopped}"
		[[ -n $pid ]] || down=1
	done
	((down)) || sinfo
	return $down
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
*)
	echo "usage: $0 start|stop|status" >&2
	exit 2
	;;
esac
