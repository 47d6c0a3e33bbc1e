/*
 * The hostile job owner's helper for tests/test_redteam.py, run as the job user.
 *
 *   racer swap A B     exchange A and B (renameat2 RENAME_EXCHANGE) as fast as it can:
 *                      a directory and a symlink trade places millions of times a second
 *   racer stop NAME    SIGSTOP every process of our uid whose comm starts with NAME
 *   racer kill NAME    SIGKILL every process of our uid whose comm starts with NAME
 *   racer chaos SEED   forever: pick one of our processes (any name) at random and
 *                      SIGSTOP, SIGCONT or SIGKILL it, pausing 0-2 ms between calls
 *                      (benchmarks/soak_liveness.py: a job owner at her worst)
 *
 * Each runs until SIGTERM, then prints how many of its calls succeeded: a race test
 * whose racer never won a single call would prove nothing. Failures (a name missing
 * for a while) are ignored: the point is to be there at the worst possible moment.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

static volatile sig_atomic_t stop_now;
static unsigned long long won;

static void on_term(int sig)
{
	(void)sig;
	stop_now = 1;
}

/* With chaos set, each matching process is signalled with probability 1/8, by a
 * signal drawn at random: stop (3/8), continue (3/8) or kill (2/8). */
static int chaos;

static int chaos_signal(void)
{
	int draw = rand() % 64;
	if (draw >= 8)
		return 0;
	return draw < 3 ? SIGSTOP : draw < 6 ? SIGCONT : SIGKILL;
}

static void for_each_own_process(int sig, const char *prefix)
{
	DIR *proc = opendir("/proc");
	struct dirent *entry;
	char path[64], comm[64];
	uid_t me = getuid();
	pid_t self = getpid();
	if (!proc)
		return;
	while ((entry = readdir(proc)) != NULL) {
		pid_t pid = (pid_t)atoi(entry->d_name);
		struct stat info;
		if (pid <= 0 || pid == self)
			continue;
		snprintf(path, sizeof(path), "/proc/%d", pid);
		if (stat(path, &info) < 0 || info.st_uid != me)
			continue;
		if (prefix) {
			snprintf(path, sizeof(path), "/proc/%d/comm", pid);
			int fd = open(path, O_RDONLY);
			ssize_t got = fd >= 0 ? read(fd, comm, sizeof(comm) - 1) : -1;
			if (fd >= 0)
				close(fd);
			if (got <= 0)
				continue;
			comm[got] = '\0';
			if (strncmp(comm, prefix, strlen(prefix)) != 0)
				continue;
		}
		int send = chaos ? chaos_signal() : sig;
		if (send && kill(pid, send) == 0)
			won++;
	}
	closedir(proc);
}

int main(int argc, char **argv)
{
	signal(SIGTERM, on_term);
	if (argc == 4 && strcmp(argv[1], "swap") == 0) {
		while (!stop_now)
			if (syscall(SYS_renameat2, AT_FDCWD, argv[2], AT_FDCWD, argv[3], RENAME_EXCHANGE) == 0)
				won++;
	} else if (argc == 3 && strcmp(argv[1], "stop") == 0) {
		while (!stop_now)
			for_each_own_process(SIGSTOP, argv[2]);
	} else if (argc == 3 && strcmp(argv[1], "chaos") == 0) {
		chaos = 1;
		srand((unsigned)atoi(argv[2]));
		while (!stop_now) {
			for_each_own_process(0, NULL);
			usleep((useconds_t)(rand() % 2000));
		}
	} else if (argc == 3 && strcmp(argv[1], "kill") == 0) {
		while (!stop_now)
			for_each_own_process(SIGKILL, argv[2]);
	} else {
		fprintf(stderr, "usage: racer swap A B | racer stop NAME | racer kill NAME | racer chaos SEED\n");
		return 2;
	}
	printf("%llu\n", won);
	return 0;
}
