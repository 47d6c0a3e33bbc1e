/*
 * shifter-sshd SPANK plugin: --image, --volume and --module for sbatch, salloc
 * and srun.
 *
 * Submission (sbatch, salloc, srun as the user): `shifter-sshd request` checks the
 * request with the prolog's own rules (image name resolved, volumes canonical and
 * allowed, modules known), so a bad request fails the command at once instead of
 * failing the job later; the resolved id is pinned and everything is handed to the
 * Prolog through the job control environment (SPANK_SHIFTER_IMAGE, _IMAGE_ID,
 * _VOLUME, _MODULE).
 *
 * Job steps (slurmstepd): SHIFTER_IMAGE, _IMAGE_ID, _VOLUME, _MODULE are set in
 * the tasks' environment for the `shifter` command, and a user error the Prolog
 * left in <state_path>/<job id>.error fails the step with that message on the
 * job's stderr. The Prolog exits 0 for user errors because a failing Prolog
 * drains the node; this is how the user hears about them instead.
 *
 * plugstack.conf:
 *   required /usr/local/lib/shifter-sshd/shifter_sshd_spank.so \
 *     shifter_sshd=/opt/shifter-sshd/venv/bin/shifter-sshd \
 *     config=/etc/shifter/udiRoot.conf state_path=/run/shifter-sshd [timeout=10]
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(shifter_sshd, 1);

#define MSG_MAX 1024
#define ID_MAX 256

enum { OPT_IMAGE, OPT_VOLUME, OPT_MODULE, OPT_COUNT };

/* Option values as given; the callback has no spank_t, so they wait here. */
static char *opt_value[OPT_COUNT];
/* Variable suffixes: SHIFTER_<x> in tasks, SPANK_SHIFTER_<x> for the Prolog. */
static const char *var_name[OPT_COUNT] = { "SHIFTER_IMAGE", "SHIFTER_VOLUME",
					   "SHIFTER_MODULE" };

static const char *arg_shifter_sshd = "/opt/shifter-sshd/venv/bin/shifter-sshd";
static const char *arg_config = NULL;
static const char *arg_state_path = "/run/shifter-sshd";
static int arg_timeout = 10; /* seconds for the submission check */

static int set_option(int val, const char *optarg, int remote)
{
	(void)remote;
	if (val < 0 || val >= OPT_COUNT || optarg == NULL)
		return -1;
	free(opt_value[val]);
	opt_value[val] = strdup(optarg);
	return opt_value[val] ? 0 : -1;
}

static struct spank_option options[] = {
	{ "image", "type:tag", "run the job in this shifter-sshd container image",
	  1, OPT_IMAGE, set_option },
	{ "volume", "/src:/dst[:ro][;...]", "bind host paths into the container",
	  1, OPT_VOLUME, set_option },
	{ "module", "name[,name...]", "site modules to load into the container",
	  1, OPT_MODULE, set_option },
	SPANK_OPTIONS_TABLE_END
};

static int parse_args(int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		if (strncmp(av[i], "shifter_sshd=", 13) == 0)
			arg_shifter_sshd = av[i] + 13;
		else if (strncmp(av[i], "config=", 7) == 0)
			arg_config = av[i] + 7;
		else if (strncmp(av[i], "state_path=", 11) == 0)
			arg_state_path = av[i] + 11;
		else if (strncmp(av[i], "timeout=", 8) == 0 && atoi(av[i] + 8) > 0)
			arg_timeout = atoi(av[i] + 8);
		else {
			slurm_error("shifter-sshd: plugstack.conf: unknown plugin argument (known: shifter_sshd=, config=, state_path=, timeout=): %s",
				    av[i]);
			return -1;
		}
	}
	return 0;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	if (parse_args(ac, av) < 0)
		return -1;
	for (struct spank_option *o = options; o->name; o++) {
		if (spank_option_register(sp, o) != ESPANK_SUCCESS) {
			slurm_error("shifter-sshd: cannot register option --%s", o->name);
			return -1;
		}
	}
	return 0;
}

/* --- submission: validate, resolve, pin, hand over to the Prolog ------------- */

/* Append what fd has to buf (NUL-terminated, at most len - 1 bytes kept); 0 at EOF. */
static int drain(int fd, char *buf, size_t len, size_t *used)
{
	char sink[512];
	ssize_t got;
	if (*used < len - 1)
		got = read(fd, buf + *used, len - 1 - *used);
	else
		got = read(fd, sink, sizeof(sink)); /* full: keep reading so the child never blocks */
	if (got < 0)
		return errno == EINTR || errno == EAGAIN ? 1 : 0;
	if (got > 0 && *used < len - 1)
		*used += (size_t)got;
	buf[*used] = '\0';
	return got > 0;
}

static void chomp(char *s)
{
	for (char *e = s + strlen(s); e > s && isspace((unsigned char)e[-1]);)
		*--e = '\0';
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Run `shifter-sshd [--config C] ARGS...` with a clean environment (nothing of the
 * user's PYTHONHOME, PYTHONPATH or LD_PRELOAD reaches it) and a deadline; collect
 * its stdout in out and its stderr in msg, reading both pipes together so a chatty
 * child never blocks on a full pipe. 0 when it exited 0.
 */
static int run_helper(const char **args, char *out, size_t out_len, char *msg)
{
	int outp[2] = { -1, -1 }, errp[2] = { -1, -1 }, status = 0;
	const char *argv[16];
	int n = 0;
	char *const envp[] = { "PATH=/usr/bin:/bin", "LANG=C.UTF-8", NULL };
	argv[n++] = arg_shifter_sshd;
	if (arg_config) {
		argv[n++] = "--config";
		argv[n++] = arg_config;
	}
	for (int i = 0; args[i] && n < 15; i++)
		argv[n++] = args[i];
	argv[n] = NULL;
	out[0] = msg[0] = '\0';
	if (pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0) {
		snprintf(msg, MSG_MAX, "pipe: %s", strerror(errno));
		goto fail;
	}
	pid_t pid = fork();
	if (pid < 0) {
		snprintf(msg, MSG_MAX, "fork: %s", strerror(errno));
		goto fail;
	}
	if (pid == 0) {
		int devnull = open("/dev/null", O_RDONLY);
		if (devnull < 0 || dup2(devnull, STDIN_FILENO) < 0 || dup2(outp[1], STDOUT_FILENO) < 0 ||
		    dup2(errp[1], STDERR_FILENO) < 0)
			_exit(126);
		execve(arg_shifter_sshd, (char *const *)argv, envp);
		dprintf(STDERR_FILENO, "cannot run %s: %s", arg_shifter_sshd, strerror(errno));
		_exit(127);
	}
	close(outp[1]);
	close(errp[1]);
	outp[1] = errp[1] = -1;
	size_t out_used = 0, msg_used = 0;
	struct pollfd fds[2] = { { outp[0], POLLIN, 0 }, { errp[0], POLLIN, 0 } };
	long long deadline = now_ms() + (long long)arg_timeout * 1000;
	int open_fds = 2, timed_out = 0;
	while (open_fds > 0) {
		long long left = deadline - now_ms();
		if (left <= 0) {
			timed_out = 1;
			break;
		}
		int ready = poll(fds, 2, (int)left);
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready < 0)
			break;
		for (int i = 0; i < 2; i++) {
			if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			int more = i == 0 ? drain(fds[i].fd, out, out_len, &out_used)
					  : drain(fds[i].fd, msg, MSG_MAX, &msg_used);
			if (!more) {
				fds[i].fd = -1;
				open_fds--;
			}
		}
	}
	if (timed_out)
		kill(pid, SIGKILL);
	pid_t waited;
	while ((waited = waitpid(pid, &status, 0)) < 0 && errno == EINTR)
		;
	close(outp[0]);
	close(errp[0]);
	chomp(out);
	chomp(msg);
	if (timed_out) {
		snprintf(msg, MSG_MAX, "no answer from %s %s within %d s (timeout= in plugstack.conf)",
			 arg_shifter_sshd, args[0], arg_timeout);
		return -1;
	}
	if (waited < 0) {
		snprintf(msg, MSG_MAX, "waitpid: %s", strerror(errno));
		return -1;
	}
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		return 0;
	if (!*msg)
		snprintf(msg, MSG_MAX, "%s %s failed (status %d)", arg_shifter_sshd, args[0], status);
	return -1;
fail:
	for (int i = 0; i < 2; i++) {
		if (outp[i] >= 0)
			close(outp[i]);
		if (errp[i] >= 0)
			close(errp[i]);
	}
	return -1;
}

/* `shifter-sshd request`: the prolog's own checks for --image, --volume, --module. */
static int check_request(char *id, char *msg)
{
	const char *args[8];
	int n = 0;
	args[n++] = "request";
	args[n++] = "--image";
	args[n++] = opt_value[OPT_IMAGE];
	if (opt_value[OPT_VOLUME]) {
		args[n++] = "--volume";
		args[n++] = opt_value[OPT_VOLUME];
	}
	if (opt_value[OPT_MODULE]) {
		args[n++] = "--module";
		args[n++] = opt_value[OPT_MODULE];
	}
	args[n] = NULL;
	if (run_helper(args, id, ID_MAX, msg) < 0)
		return -1;
	if (!*id) {
		snprintf(msg, MSG_MAX, "request check printed no image id");
		return -1;
	}
	return 0;
}

static int resolve_request(char *id)
{
	char msg[MSG_MAX];
	if (check_request(id, msg) == 0)
		return 0;
	/* The last line is the error; it names where, what and which value itself. */
	char *line = strrchr(msg, '\n') ? strrchr(msg, '\n') + 1 : msg;
	if (strncmp(line, "shifter-sshd: ", 14) == 0)
		line += 14;
	slurm_error("shifter-sshd: %s", line);
	return -1;
}

/*
 * SPANK_<name> for the Prolog and Epilog, and SLURM_SPANK_<name> in this
 * command's environment, which the job's steps inherit: sbatch and salloc would
 * export it themselves, srun does not.
 */
static int control_setenv(spank_t sp, const char *name, const char *value)
{
	char exported[64];
	spank_err_t rc = spank_job_control_setenv(sp, name, value, 1);
	if (rc != ESPANK_SUCCESS) {
		slurm_error("shifter-sshd: cannot pass %s to the prolog: %s", name,
			    spank_strerror(rc));
		return -1;
	}
	snprintf(exported, sizeof(exported), "SLURM_SPANK_%s", name);
	setenv(exported, value, 1);
	return 0;
}

static int submit(spank_t sp)
{
	char id[ID_MAX];
	if (!opt_value[OPT_IMAGE]) {
		if (opt_value[OPT_VOLUME] || opt_value[OPT_MODULE]) {
			slurm_error("shifter-sshd: --%s needs --image: %s",
				    opt_value[OPT_VOLUME] ? "volume" : "module",
				    opt_value[OPT_VOLUME] ? opt_value[OPT_VOLUME] : opt_value[OPT_MODULE]);
			return -1;
		}
		return 0; /* not a container job: nothing to do */
	}
	if (resolve_request(id) < 0)
		return -1;
	if (control_setenv(sp, "SHIFTER_IMAGE_ID", id) < 0)
		return -1;
	for (int i = 0; i < OPT_COUNT; i++) {
		if (opt_value[i] && control_setenv(sp, var_name[i], opt_value[i]) < 0)
			return -1;
	}
	return 0;
}

/* --- job steps: the tasks' environment and the Prolog's user errors ---------- */

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	spank_context_t ctx = spank_context();
	if (ctx == S_CTX_LOCAL || ctx == S_CTX_ALLOCATOR)
		return submit(sp);
	return 0;
}

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	char buf[MSG_MAX], name[64];
	for (int i = 0; i < OPT_COUNT; i++) {
		const char *value = opt_value[i];
		/* sbatch and salloc export the control environment as SLURM_SPANK_*. */
		snprintf(name, sizeof(name), "SLURM_SPANK_%s", var_name[i]);
		if (!value && spank_getenv(sp, name, buf, sizeof(buf)) == ESPANK_SUCCESS)
			value = buf;
		if (value)
			spank_setenv(sp, var_name[i], value, 1);
	}
	if (spank_getenv(sp, "SLURM_SPANK_SHIFTER_IMAGE_ID", buf, sizeof(buf)) == ESPANK_SUCCESS)
		spank_setenv(sp, "SHIFTER_IMAGE_ID", buf, 1);
	/* `shifter` in the tasks reads the same udiRoot.conf as the Prolog. */
	if (arg_config && spank_getenv(sp, "SHIFTER_IMAGE_ID", buf, sizeof(buf)) == ESPANK_SUCCESS)
		spank_setenv(sp, "SHIFTER_SSHD_CONFIG", arg_config, 0);
	return 0;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	uint32_t job_id;
	char path[4096], msg[MSG_MAX];
	if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS)
		return 0;
	snprintf(path, sizeof(path), "%s/%u.error", arg_state_path, job_id);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0; /* the usual case: the Prolog had nothing to say */
	size_t used = 0;
	msg[0] = '\0';
	while (drain(fd, msg, sizeof(msg), &used))
		;
	close(fd);
	chomp(msg);
	/* This process is the task: its stderr is the job's. */
	dprintf(STDERR_FILENO, "%s\n", *msg ? msg : "shifter-sshd: the container could not be set up");
	return -1;
}

#ifndef SLURM_EXTERN_CONT
#define SLURM_EXTERN_CONT 0xfffffffc
#endif

/*
 * In the job's extern step (slurmstepd, root), before Slurm reports the prolog done:
 * put the container sshd the Prolog started into this step (`shifter-sshd adopt`),
 * so it and everything started through it belong to the job. No job step, hence no
 * ssh session, can start before this returns. A failure is the node's (the extern
 * step would not take the sshd): returning -1 fails the prolog (24.05 and later) or
 * is logged (22.05); `adopt` also leaves the reason in <job>.error for the job.
 */
int slurm_spank_task_post_fork(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	uint32_t job_id, step_id;
	char job[32], path[4096], out[64], msg[MSG_MAX];
	if (spank_context() != S_CTX_REMOTE)
		return 0;
	if (spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS ||
	    step_id != SLURM_EXTERN_CONT || spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS)
		return 0;
	snprintf(path, sizeof(path), "%s/%u.json", arg_state_path, job_id);
	if (access(path, F_OK) != 0)
		return 0; /* no container on this node: nothing to adopt */
	snprintf(job, sizeof(job), "%u", job_id);
	const char *args[] = { "adopt", job, NULL };
	if (run_helper(args, out, sizeof(out), msg) == 0)
		return 0;
	char *line = strrchr(msg, '\n') ? strrchr(msg, '\n') + 1 : msg;
	slurm_error("%s", *line ? line : "shifter-sshd: adopt failed");
	return -1;
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	(void)sp;
	(void)ac;
	(void)av;
	for (int i = 0; i < OPT_COUNT; i++) {
		free(opt_value[i]);
		opt_value[i] = NULL;
	}
	return 0;
}
