/*
 * sdk_smoke.c: the fedrec SDK used from C the way an app embeds it, through include/fedrec.h
 * and the static library. tests/tests/c_abi.rs compiles it with the system `cc`, starts a
 * real coordinator on loopback and runs it. Every status is checked; the first failure
 * prints the call, the status and the SDK's message, and exits 1.
 *
 *   sdk_smoke misuse       ABI misuse: NULL pointers, invalid UTF-8, bad lengths, bad kinds,
 *                          an empty folder path, a second open of a folder in use.
 *   sdk_smoke locked       the folder is held by another process: open and erase are refused.
 *   sdk_smoke no-consent   events recorded without training consent: participate refuses
 *                          before connecting (the driver checks the coordinator saw nothing).
 *   sdk_smoke full         open, wrong key, consent, events, a round, recommendations, segment,
 *                          explanation, rules and a variant, export (with the privacy record),
 *                          a second device under the production privacy policy that refuses
 *                          the coordinator's noiseless task (FEDREC_REFUSAL_NOISE_TOO_LOW),
 *                          forget, close.
 *
 * Environment (set by the driver): FEDREC_STORE_DIR, FEDREC_COORDINATOR (IP:port),
 * FEDREC_CERT (DER file), FEDREC_TOKEN (hex), FEDREC_RULES_KEY (raw public key file),
 * FEDREC_RULES_SIGNED (the published signed ruleset file).
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fedrec.h"

/* The model shape the driver configures the coordinator with. */
#define N_ITEMS 40
#define DIM 4
#define N_SEGMENTS 2

static FedrecError *err = NULL;

/* Checks that `got` is `want`; on success `err` must be NULL, on failure it must carry the
 * same code and a message. Exits on the first mismatch. */
static void expect(int32_t got, int32_t want, const char *call, int line) {
    if (got != want) {
        fprintf(stderr, "FAIL line %d: %s returned %d, expected %d: %s\n", line, call, got, want,
                err != NULL && err->message != NULL ? err->message : "(no error message)");
        exit(1);
    }
    if (want == FEDREC_OK && err != NULL) {
        fprintf(stderr, "FAIL line %d: %s succeeded but set an error\n", line, call);
        exit(1);
    }
    if (want != FEDREC_OK) {
        if (err == NULL || err->code != want || err->message == NULL || err->message[0] == '\0') {
            fprintf(stderr, "FAIL line %d: %s returned %d without a matching error\n", line, call, got);
            exit(1);
        }
        printf("  expected status %d from %s: %s\n", got, call, err->message);
    }
    fedrec_error_free(err);
    err = NULL;
}

#define OK(call) expect((call), FEDREC_OK, #call, __LINE__)
#define FAILS(call, status) expect((call), (status), #call, __LINE__)
#define REQUIRE(cond)                                                                   \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "FAIL line %d: %s\n", __LINE__, #cond);                     \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

static const char *env(const char *name) {
    const char *v = getenv(name);
    if (v == NULL || v[0] == '\0') {
        fprintf(stderr, "FAIL: %s is not set\n", name);
        exit(1);
    }
    return v;
}

/* Reads a whole file into a malloc'd buffer. */
static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    REQUIRE(f != NULL);
    REQUIRE(fseek(f, 0, SEEK_END) == 0);
    long size = ftell(f);
    REQUIRE(size >= 0 && fseek(f, 0, SEEK_SET) == 0);
    uint8_t *buf = malloc((size_t)size + 1);
    REQUIRE(buf != NULL);
    REQUIRE(fread(buf, 1, (size_t)size, f) == (size_t)size);
    fclose(f);
    *len = (size_t)size;
    return buf;
}

/* Decodes a hex string into a malloc'd buffer. */
static uint8_t *from_hex(const char *hex, size_t *len) {
    size_t n = strlen(hex);
    REQUIRE(n % 2 == 0);
    uint8_t *buf = malloc(n / 2 + 1);
    REQUIRE(buf != NULL);
    for (size_t i = 0; i < n / 2; i++) {
        unsigned int byte;
        REQUIRE(sscanf(hex + 2 * i, "%2x", &byte) == 1);
        buf[i] = (uint8_t)byte;
    }
    *len = n / 2;
    return buf;
}

/* Entries in `dir` other than "." and "..". */
static int count_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (d == NULL) return 0; /* the folder itself may be gone */
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) n++;
    }
    closedir(d);
    return n;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static const uint8_t KEY[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32};
static const uint8_t OTHER_KEY[32] = {99};

/* The items the user consumes in `full`. */
static const uint32_t CONSUMED[] = {1, 3, 5, 7, 11, 13, 17, 19};
#define N_CONSUMED (sizeof CONSUMED / sizeof CONSUMED[0])

struct setup {
    FedrecCoordinator coordinator;
    FedrecOpenOptions options;
    FedrecPrivacyPolicy policy;
    uint8_t *cert, *token, *rules_key;
};

/* Fills `s` in place: its options point at its coordinator. */
static void configure(struct setup *s) {
    size_t cert_len, token_len, rules_key_len;
    s->cert = read_file(env("FEDREC_CERT"), &cert_len);
    s->token = from_hex(env("FEDREC_TOKEN"), &token_len);
    s->rules_key = read_file(env("FEDREC_RULES_KEY"), &rules_key_len);
    s->coordinator = (FedrecCoordinator){
        .address = env("FEDREC_COORDINATOR"),
        .server_name = "localhost",
        .cert_der = s->cert,
        .cert_der_len = cert_len,
        .token = s->token,
        .token_len = token_len,
        .n_items = N_ITEMS,
        .dim = DIM,
        .n_segments = N_SEGMENTS,
        .timeout_ms = 10000,
    };
    s->options = fedrec_open_options_default();
    s->options.max_events = 1000;
    s->options.half_life_s = 7 * 24 * 3600;
    s->options.coordinator = &s->coordinator;
    s->options.rules_public_key = s->rules_key;
    s->options.rules_public_key_len = rules_key_len;
    /* The test coordinator adds no noise: this device's policy is lowered to take part (a
     * second device in `full` keeps the production policy and refuses). */
    s->policy = fedrec_privacy_policy_production();
    s->policy.min_noise_multiplier = 0.0;
    s->policy.max_epsilon_per_round = INFINITY;
    s->policy.max_total_epsilon = INFINITY;
    s->policy.min_cohort = 0;
    s->policy.require_sampling = false;
    /* ... and it aggregates in the clear (a first-come cohort of one is too small for SecAgg+). */
    s->policy.require_secure_aggregation = false;
    s->options.policy = &s->policy;
}

static void release(struct setup *s) {
    free(s->cert);
    free(s->token);
    free(s->rules_key);
}

/* Misuse of the ABI: every call fails with a status and a message, nothing crashes. */
static int misuse(void) {
    const char *dir = env("FEDREC_STORE_DIR");
    FedrecSdk *sdk = NULL;
    bool flag = false;
    uint32_t id = 0;
    float distance = 0.0f;
    char *text = NULL;
    FedrecRecommendations recs = {NULL, 0};
    FedrecParticipation report = {0};

    /* NULL handle. */
    FAILS(fedrec_sdk_set_consent(NULL, true, true, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_record(NULL, 1, FEDREC_EVENT_VIEW, 1.0f, 0, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_recommend(NULL, 5, NULL, &recs, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_segment(NULL, &flag, &id, &distance, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_export(NULL, &text, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_participate(NULL, NULL, NULL, &report, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_forget(NULL, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_cancel_cancel(NULL, &err), FEDREC_ERR_NULL_POINTER);
    /* A NULL `err` still gets the status. */
    REQUIRE(fedrec_sdk_forget(NULL, NULL) == FEDREC_ERR_NULL_POINTER);

    /* Bad arguments to open. */
    FAILS(fedrec_sdk_open(NULL, KEY, 32, NULL, &sdk, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_open(dir, NULL, 32, NULL, &sdk, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_open(dir, KEY, 32, NULL, NULL, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_open(dir, KEY, 16, NULL, &sdk, &err), FEDREC_ERR_INVALID_ARGUMENT);
    FAILS(fedrec_sdk_open("/tmp/\xff\xfe-not-utf8", KEY, 32, NULL, &sdk, &err), FEDREC_ERR_INVALID_UTF8);
    /* An empty path would put the store in the working directory. */
    FAILS(fedrec_sdk_open("", KEY, 32, NULL, &sdk, &err), FEDREC_ERR_INVALID_ARGUMENT);
    FAILS(fedrec_sdk_erase("", &err), FEDREC_ERR_INVALID_ARGUMENT);
    FedrecCoordinator bad = {.address = "not an address", .server_name = "localhost"};
    FedrecOpenOptions options = fedrec_open_options_default();
    options.coordinator = &bad;
    FAILS(fedrec_sdk_open(dir, KEY, 32, &options, &sdk, &err), FEDREC_ERR_INVALID_ARGUMENT);
    REQUIRE(sdk == NULL);
    /* A privacy policy with a delta outside (0, 1) is refused. */
    FedrecPrivacyPolicy bad_policy = fedrec_privacy_policy_production();
    bad_policy.delta = 2.0;
    options = fedrec_open_options_default();
    options.policy = &bad_policy;
    FAILS(fedrec_sdk_open(dir, KEY, 32, &options, &sdk, &err), FEDREC_ERR_INVALID_ARGUMENT);
    REQUIRE(sdk == NULL);

    /* Bad arguments on an open handle. */
    OK(fedrec_sdk_open(dir, KEY, 32, NULL, &sdk, &err));
    REQUIRE(sdk != NULL);
    /* One handle per folder: a second open (any key) and an erase are refused while it is open. */
    FedrecSdk *second = NULL;
    FAILS(fedrec_sdk_open(dir, KEY, 32, NULL, &second, &err), FEDREC_ERR_LOCKED);
    FAILS(fedrec_sdk_open(dir, OTHER_KEY, 32, NULL, &second, &err), FEDREC_ERR_LOCKED);
    REQUIRE(second == NULL);
    FAILS(fedrec_sdk_erase(dir, &err), FEDREC_ERR_LOCKED);
    FAILS(fedrec_sdk_record(sdk, 1, FEDREC_EVENT_VIEW, 1.0f, 0, &err), FEDREC_ERR_CONSENT_REQUIRED);
    OK(fedrec_sdk_set_consent(sdk, true, false, &err));
    FAILS(fedrec_sdk_record(sdk, 1, 99, 1.0f, 0, &err), FEDREC_ERR_INVALID_ARGUMENT);
    FAILS(fedrec_sdk_record(sdk, 1, FEDREC_EVENT_RATING, -1.0f, 0, &err), FEDREC_ERR_INVALID_ARGUMENT);
    FAILS(fedrec_sdk_consent(sdk, NULL, &flag, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_recommend(sdk, 5, NULL, NULL, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_recommend(sdk, 5, NULL, &recs, &err), FEDREC_ERR_NO_MODEL);
    FAILS(fedrec_sdk_segment(sdk, &flag, NULL, &distance, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_export(sdk, NULL, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_explain(sdk, 1, NULL, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_install_ruleset(sdk, NULL, 10, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_install_ruleset(sdk, (const uint8_t *)"junk", 4, &err), FEDREC_ERR_NOT_CONFIGURED);
    const char *tags[] = {"drama", "\xc3\x28"};
    FAILS(fedrec_sdk_set_item_tags(sdk, 1, tags, 2, &err), FEDREC_ERR_INVALID_UTF8);
    FAILS(fedrec_sdk_set_item_tags(sdk, 1, NULL, 2, &err), FEDREC_ERR_NULL_POINTER);
    FedrecContext ctx = {.hour = 12, .minute = 0, .weekday = 0};
    FAILS(fedrec_sdk_choose_variant(sdk, "\xff", &ctx, &text, &err), FEDREC_ERR_INVALID_UTF8);
    FAILS(fedrec_sdk_choose_variant(sdk, "home_banner", NULL, &text, &err), FEDREC_ERR_NULL_POINTER);
    FAILS(fedrec_sdk_choose_variant(sdk, "home_banner", &ctx, &text, &err), FEDREC_ERR_NOT_CONFIGURED);
    FAILS(fedrec_sdk_participate(sdk, NULL, NULL, &report, &err), FEDREC_ERR_CONSENT_REQUIRED);
    REQUIRE(text == NULL && recs.items == NULL);

    /* A failed call empties every out-parameter, even one left holding garbage, so freeing
     * them whatever the status is safe. */
    static FedrecRecommendation not_ours[3];
    static char not_a_result[] = "garbage";
    recs = (FedrecRecommendations){not_ours, 3};
    FAILS(fedrec_sdk_recommend(sdk, 5, NULL, &recs, &err), FEDREC_ERR_NO_MODEL);
    REQUIRE(recs.items == NULL && recs.len == 0);
    fedrec_recommendations_free(&recs);
    text = not_a_result;
    FAILS(fedrec_sdk_choose_variant(sdk, "home_banner", &ctx, &text, &err), FEDREC_ERR_NOT_CONFIGURED);
    REQUIRE(text == NULL);
    fedrec_string_free(text);
    text = not_a_result;
    FAILS(fedrec_sdk_explain(sdk, 1, &text, &err), FEDREC_ERR_NO_MODEL);
    REQUIRE(text == NULL);
    flag = true;
    distance = 1.0f;
    FAILS(fedrec_sdk_segment(sdk, &flag, NULL, &distance, &err), FEDREC_ERR_NULL_POINTER);
    REQUIRE(!flag && distance == 0.0f);
    report.selected = report.completed = true;
    report.retry_after_ms = 5;
    FAILS(fedrec_sdk_participate(sdk, NULL, NULL, &report, &err), FEDREC_ERR_CONSENT_REQUIRED);
    REQUIRE(!report.selected && !report.completed && report.retry_after_ms == -1);
    FedrecSdk *not_opened = (FedrecSdk *)(uintptr_t)0xdeadbee8u;
    FAILS(fedrec_sdk_open(dir, KEY, 16, NULL, &not_opened, &err), FEDREC_ERR_INVALID_ARGUMENT);
    REQUIRE(not_opened == NULL);
    fedrec_sdk_close(not_opened);

    /* Freeing NULL is allowed everywhere. */
    fedrec_error_free(NULL);
    fedrec_string_free(NULL);
    fedrec_recommendations_free(NULL);
    fedrec_recommendations_free(&recs);
    fedrec_cancel_free(NULL);
    fedrec_sdk_close(NULL);

    OK(fedrec_sdk_forget(sdk, &err));
    fedrec_sdk_close(sdk);
    /* Forgetting released the folder: it opens again. */
    OK(fedrec_sdk_open(dir, KEY, 32, NULL, &sdk, &err));
    OK(fedrec_sdk_forget(sdk, &err));
    fedrec_sdk_close(sdk);
    REQUIRE(count_entries(dir) == 0);
    return 0;
}

/* The driver holds the folder open in its own process: this process is refused. */
static int locked(void) {
    const char *dir = env("FEDREC_STORE_DIR");
    FedrecSdk *sdk = NULL;
    int entries = count_entries(dir);
    REQUIRE(entries > 0);
    FAILS(fedrec_sdk_open(dir, KEY, 32, NULL, &sdk, &err), FEDREC_ERR_LOCKED);
    REQUIRE(sdk == NULL);
    FAILS(fedrec_sdk_erase(dir, &err), FEDREC_ERR_LOCKED);
    REQUIRE(count_entries(dir) == entries);
    return 0;
}

/* Events without training consent: participate refuses before any connection. */
static int no_consent(void) {
    const char *dir = env("FEDREC_STORE_DIR");
    struct setup s;
    configure(&s);
    FedrecSdk *sdk = NULL;
    OK(fedrec_sdk_open(dir, KEY, 32, &s.options, &sdk, &err));
    OK(fedrec_sdk_set_consent(sdk, true, false, &err));
    OK(fedrec_sdk_record(sdk, 2, FEDREC_EVENT_CLICK, 1.0f, (int64_t)time(NULL), &err));
    FedrecParticipateOptions popts = fedrec_participate_options_default();
    popts.charging = true;
    FedrecParticipation report = {0};
    FAILS(fedrec_sdk_participate(sdk, &popts, NULL, &report, &err), FEDREC_ERR_CONSENT_REQUIRED);
    /* Withdrawing consent after giving it refuses the same way. */
    OK(fedrec_sdk_set_consent(sdk, true, true, &err));
    OK(fedrec_sdk_set_consent(sdk, true, false, &err));
    FAILS(fedrec_sdk_participate(sdk, &popts, NULL, &report, &err), FEDREC_ERR_CONSENT_REQUIRED);
    OK(fedrec_sdk_forget(sdk, &err));
    fedrec_sdk_close(sdk);
    release(&s);
    return 0;
}

static bool consumed(uint32_t item) {
    for (size_t i = 0; i < N_CONSUMED; i++)
        if (CONSUMED[i] == item) return true;
    return false;
}

static int full(void) {
    const char *dir = env("FEDREC_STORE_DIR");
    struct setup s;
    configure(&s);
    FedrecSdk *sdk = NULL;
    printf("fedrec %s\n", fedrec_version());

    /* A store is created, then refuses another key and stays intact. */
    OK(fedrec_sdk_open(dir, KEY, 32, &s.options, &sdk, &err));
    OK(fedrec_sdk_set_consent(sdk, true, true, &err));
    fedrec_sdk_close(sdk);
    sdk = NULL;
    REQUIRE(count_entries(dir) > 0);
    FAILS(fedrec_sdk_open(dir, OTHER_KEY, 32, &s.options, &sdk, &err), FEDREC_ERR_WRONG_KEY_OR_CORRUPT);
    REQUIRE(sdk == NULL);
    OK(fedrec_sdk_open(dir, KEY, 32, &s.options, &sdk, &err));
    bool personalization = false, training = false;
    OK(fedrec_sdk_consent(sdk, &personalization, &training, &err));
    REQUIRE(personalization && training);

    /* Events and item metadata. */
    int64_t now = (int64_t)time(NULL);
    for (size_t i = 0; i < N_CONSUMED; i++) {
        OK(fedrec_sdk_record(sdk, CONSUMED[i], FEDREC_EVENT_VIEW, 1.0f, now - 3600 * (int64_t)i, &err));
    }
    OK(fedrec_sdk_record(sdk, CONSUMED[0], FEDREC_EVENT_PURCHASE, 1.0f, now, &err));
    OK(fedrec_sdk_record(sdk, CONSUMED[1], FEDREC_EVENT_RATING, 4.5f, now, &err));
    OK(fedrec_sdk_record(sdk, CONSUMED[2], FEDREC_EVENT_CUSTOM + 7, 1.0f, now, &err));
    const char *drama[] = {"drama", "classic"};
    const char *comedy[] = {"comedy"};
    OK(fedrec_sdk_set_item_tags(sdk, 1, drama, 2, &err));
    OK(fedrec_sdk_set_item_tags(sdk, 2, drama, 2, &err));
    OK(fedrec_sdk_set_item_tags(sdk, 4, comedy, 1, &err));

    /* No model yet. */
    FedrecRecommendations recs = {NULL, 0};
    FAILS(fedrec_sdk_recommend(sdk, 10, NULL, &recs, &err), FEDREC_ERR_NO_MODEL);

    /* The coordinator requires charging: a device that is not charging is refused. */
    FedrecParticipateOptions popts = fedrec_participate_options_default();
    popts.time_budget_ms = 30000;
    popts.max_attempts = 3;
    popts.initial_backoff_ms = 100;
    popts.max_backoff_ms = 1000;
    FedrecParticipation report = {0};
    FAILS(fedrec_sdk_participate(sdk, &popts, NULL, &report, &err), FEDREC_ERR_NOT_ELIGIBLE);

    /* A cancelled token stops a participation. */
    popts.charging = true;
    FedrecCancel *cancel = NULL;
    OK(fedrec_cancel_new(&cancel, &err));
    OK(fedrec_cancel_cancel(cancel, &err));
    FAILS(fedrec_sdk_participate(sdk, &popts, cancel, &report, &err), FEDREC_ERR_CANCELLED);
    fedrec_cancel_free(cancel);

    /* One round, end to end: retried while not selected, a bounded number of times. */
    bool completed = false;
    for (int attempt = 0; attempt < 20 && !completed; attempt++) {
        FedrecCancel *token = NULL;
        OK(fedrec_cancel_new(&token, &err));
        int32_t status = fedrec_sdk_participate(sdk, &popts, token, &report, &err);
        fedrec_cancel_free(token);
        if (status == FEDREC_ERR_NETWORK) {
            printf("  attempt %d: %s\n", attempt, err->message);
            fedrec_error_free(err);
            err = NULL;
            sleep_ms(200);
            continue;
        }
        expect(status, FEDREC_OK, "fedrec_sdk_participate", __LINE__);
        printf("  attempt %d: outcome %u, selected %d, completed %d\n", attempt, (unsigned)report.outcome,
               report.selected, report.completed);
        completed = report.completed;
        if (!completed) sleep_ms(report.retry_after_ms > 0 && report.retry_after_ms < 2000 ? report.retry_after_ms : 200);
    }
    REQUIRE(completed);
    REQUIRE(report.outcome == FEDREC_ROUND_OUTCOME_COMPLETED && report.has_round);
    REQUIRE(report.has_model_version);
    bool has_model = false;
    uint64_t version = 0;
    OK(fedrec_sdk_model_version(sdk, &has_model, &version, &err));
    REQUIRE(has_model && version == report.model_version);

    /* Recommendations: valid items, best first, none the user consumed. */
    OK(fedrec_sdk_recommend(sdk, 10, NULL, &recs, &err));
    REQUIRE(recs.len == 10 && recs.items != NULL);
    for (size_t i = 0; i < recs.len; i++) {
        REQUIRE(recs.items[i].item < N_ITEMS);
        REQUIRE(!consumed(recs.items[i].item));
        REQUIRE(i == 0 || recs.items[i - 1].score >= recs.items[i].score);
        REQUIRE(recs.items[i].source <= FEDREC_SOURCE_POPULARITY);
    }
    uint32_t top = recs.items[0].item;
    fedrec_recommendations_free(&recs);
    REQUIRE(recs.items == NULL && recs.len == 0);

    /* Options: an allow-list and an exclusion. */
    const uint32_t only[] = {0, 1, 2, 4, 6};
    const uint32_t never[] = {4};
    FedrecRecommendOptions ropts = fedrec_recommend_options_default();
    ropts.include_only = only;
    ropts.include_only_len = 5;
    ropts.exclude = never;
    ropts.exclude_len = 1;
    ropts.content_blend = 0.5f;
    OK(fedrec_sdk_recommend(sdk, 10, &ropts, &recs, &err));
    REQUIRE(recs.len == 3); /* 0, 2, 6: 1 is consumed, 4 excluded */
    for (size_t i = 0; i < recs.len; i++) {
        uint32_t item = recs.items[i].item;
        REQUIRE(item == 0 || item == 2 || item == 6);
    }
    fedrec_recommendations_free(&recs);
    ropts.content_blend = 2.0f;
    FAILS(fedrec_sdk_recommend(sdk, 10, &ropts, &recs, &err), FEDREC_ERR_INVALID_ARGUMENT);

    /* Segment and explanation, on the device. */
    bool found = false;
    uint32_t segment = 0;
    float distance = -1.0f;
    OK(fedrec_sdk_segment(sdk, &found, &segment, &distance, &err));
    REQUIRE(found && segment < N_SEGMENTS && distance >= 0.0f);
    char *json = NULL;
    OK(fedrec_sdk_explain(sdk, top, &json, &err));
    REQUIRE(json != NULL && json[0] == '{' && strstr(json, "\"because\"") != NULL);
    fedrec_string_free(json);

    /* Rules: fetched from the coordinator, verified, evaluated on the device. */
    bool updated = false;
    OK(fedrec_sdk_fetch_ruleset(sdk, &updated, &err));
    REQUIRE(updated);
    OK(fedrec_sdk_fetch_ruleset(sdk, &updated, &err));
    REQUIRE(!updated);
    char *variant = NULL;
    FedrecContext saturday_phone = {.hour = 21, .minute = 30, .weekday = 5, .location = "Berlin", .device_type = "phone"};
    OK(fedrec_sdk_choose_variant(sdk, "home_banner", &saturday_phone, &variant, &err));
    REQUIRE(variant != NULL && strcmp(variant, "weekend_phone") == 0);
    fedrec_string_free(variant);
    FedrecContext monday = {.hour = 9, .minute = 0, .weekday = 0};
    OK(fedrec_sdk_choose_variant(sdk, "home_banner", &monday, &variant, &err));
    REQUIRE(strcmp(variant, "generic") == 0);
    fedrec_string_free(variant);
    variant = NULL;
    FAILS(fedrec_sdk_choose_variant(sdk, "no_such_slot", &monday, &variant, &err), FEDREC_ERR_INVALID_ARGUMENT);
    FedrecContext bad_hour = {.hour = 25, .minute = 0, .weekday = 0};
    FAILS(fedrec_sdk_choose_variant(sdk, "home_banner", &bad_hour, &variant, &err), FEDREC_ERR_INVALID_ARGUMENT);
    REQUIRE(variant == NULL);
    /* A tampered copy of the published ruleset is refused; the installed one stays. */
    size_t signed_len;
    uint8_t *signed_ruleset = read_file(env("FEDREC_RULES_SIGNED"), &signed_len);
    REQUIRE(signed_len > 8);
    signed_ruleset[signed_len / 2] ^= 0x01;
    FAILS(fedrec_sdk_install_ruleset(sdk, signed_ruleset, signed_len, &err), FEDREC_ERR_RULES_REJECTED);
    free(signed_ruleset);
    OK(fedrec_sdk_choose_variant(sdk, "home_banner", &saturday_phone, &variant, &err));
    REQUIRE(strcmp(variant, "weekend_phone") == 0);
    fedrec_string_free(variant);

    /* Export: everything stored, as JSON. */
    OK(fedrec_sdk_export(sdk, &json, &err));
    REQUIRE(strstr(json, "\"events\"") != NULL && strstr(json, "\"consent\"") != NULL);
    /* The device's own privacy record: the round it contributed to. */
    REQUIRE(strstr(json, "\"privacy_record\"") != NULL);
    REQUIRE(strstr(json, "\"rounds_contributed\": 1") != NULL);
    fedrec_string_free(json);

    /* A second device with the production privacy policy (the default): the coordinator's
     * task has no noise, so the device refuses it before training and sends nothing. */
    char strict_dir[4096];
    snprintf(strict_dir, sizeof strict_dir, "%s-strict", dir);
    FedrecOpenOptions strict_options = s.options;
    strict_options.policy = NULL;
    FedrecSdk *strict = NULL;
    OK(fedrec_sdk_open(strict_dir, KEY, 32, &strict_options, &strict, &err));
    OK(fedrec_sdk_set_consent(strict, true, true, &err));
    OK(fedrec_sdk_record(strict, CONSUMED[0], FEDREC_EVENT_CLICK, 1.0f, now, &err));
    bool refused = false;
    for (int attempt = 0; attempt < 20 && !refused; attempt++) {
        int32_t status = fedrec_sdk_participate(strict, &popts, NULL, &report, &err);
        if (status == FEDREC_ERR_NETWORK) {
            fedrec_error_free(err);
            err = NULL;
            sleep_ms(200);
            continue;
        }
        expect(status, FEDREC_OK, "fedrec_sdk_participate (strict)", __LINE__);
        printf("  strict attempt %d: outcome %u, refusal %u\n", attempt, (unsigned)report.outcome,
               (unsigned)report.refusal);
        refused = report.outcome == FEDREC_ROUND_OUTCOME_POLICY_REFUSED;
        if (!refused) {
            REQUIRE(report.refusal == FEDREC_REFUSAL_NONE && !report.completed);
            sleep_ms(report.retry_after_ms > 0 && report.retry_after_ms < 2000 ? report.retry_after_ms : 200);
        }
    }
    REQUIRE(refused);
    REQUIRE(report.refusal == FEDREC_REFUSAL_NOISE_TOO_LOW && !report.completed && report.has_round);
    OK(fedrec_sdk_export(strict, &json, &err));
    REQUIRE(strstr(json, "\"rounds_contributed\": 0") != NULL);
    fedrec_string_free(json);
    OK(fedrec_sdk_forget(strict, &err));
    fedrec_sdk_close(strict);

    /* Forget: no file left, the handle is closed. */
    OK(fedrec_sdk_forget(sdk, &err));
    REQUIRE(count_entries(dir) == 0);
    FAILS(fedrec_sdk_record(sdk, 1, FEDREC_EVENT_VIEW, 1.0f, now, &err), FEDREC_ERR_CLOSED);
    FAILS(fedrec_sdk_recommend(sdk, 10, NULL, &recs, &err), FEDREC_ERR_CLOSED);
    fedrec_sdk_close(sdk);
    release(&s);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s misuse|locked|no-consent|full\n", argv[0]);
        return 2;
    }
    int rc;
    if (strcmp(argv[1], "misuse") == 0) {
        rc = misuse();
    } else if (strcmp(argv[1], "locked") == 0) {
        rc = locked();
    } else if (strcmp(argv[1], "no-consent") == 0) {
        rc = no_consent();
    } else if (strcmp(argv[1], "full") == 0) {
        rc = full();
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    if (rc == 0) printf("sdk_smoke %s: all checks passed\n", argv[1]);
    return rc;
}
