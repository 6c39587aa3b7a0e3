using System.Collections;
using System.CommandLine;
using System.Globalization;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Configuration.EnvironmentVariables;
using Microsoft.Extensions.Configuration.Memory;

namespace NbdServer.Common.Cli;

/// <summary>
/// The settings of a daemon from three sources, read through Microsoft.Extensions.Configuration: a
/// JSON file, environment variables with a prefix, and the command line (parsed by System.CommandLine).
/// The command line overrides the environment, which overrides the file.
/// </summary>
/// <remarks>
/// A setting's key is its long option name without the dashes: <c>{"listen": "0.0.0.0:10809",
/// "max-outstanding-jobs": 900, "read-only": true, "downstairs": ["a:3810", "b:3810", "c:3810"]}</c>;
/// its variable is the prefix plus the name in capitals with underscores
/// (<c>NBD_SERVER_MAX_OUTSTANDING_JOBS=900</c>). Unknown keys and variables are refused: a typo must
/// not pass silently. Every value is kept with its source, so an error names where the bad value was set.
/// </remarks>
public sealed class LayeredSettings
{
    private const string CommandLineSource = "on the command line";

    private readonly Dictionary<string, (string Value, string Source)> _values;

    private LayeredSettings(Dictionary<string, (string Value, string Source)> values, string? configFile, IConfigurationRoot root)
    {
        _values = values;
        ConfigFile = configFile;
        Configuration = root;
    }

    /// <summary>The config file that was read, if any.</summary>
    public string? ConfigFile { get; }

    /// <summary>All sources, in the order they were added (file, environment, command line).</summary>
    public IConfigurationRoot Configuration { get; }

    /// <summary>
    /// Reads the sources. <paramref name="options"/> are the settings (the options of the command,
    /// less --config and --help); the config file is <c>--config FILE</c>, else the variable
    /// <c>{prefix}CONFIG</c>, else <paramref name="defaultConfigFile"/> when it exists.
    /// <paramref name="environment"/> replaces the process environment (tests).
    /// </summary>
    public static LayeredSettings Load(ParseResult commandLine, IReadOnlyList<Option> options, string environmentPrefix,
        string? configFile, string? defaultConfigFile, IDictionary? environment = null)
    {
        var byKey = options.ToDictionary(o => Key(o.Name), StringComparer.Ordinal);
        string configVariable = environmentPrefix + "CONFIG";
        string? fromEnvironment = environment is null ? Environment.GetEnvironmentVariable(configVariable) : environment[configVariable] as string;
        configFile ??= string.IsNullOrEmpty(fromEnvironment) ? null : fromEnvironment;
        if (configFile is null && defaultConfigFile is not null && File.Exists(defaultConfigFile))
        {
            configFile = defaultConfigFile;
        }

        var builder = new ConfigurationBuilder();
        if (configFile is not null)
        {
            byte[] bytes;
            try
            {
                bytes = File.ReadAllBytes(configFile);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new ArgumentException($"--config: cannot read {configFile}: {e.Message}", e);
            }
            builder.AddJsonStream(new MemoryStream(bytes));
        }
        if (environment is null)
        {
            builder.AddEnvironmentVariables(environmentPrefix);
        }
        else
        {
            // Tests hand in an environment; the same prefix rule as the provider above.
            builder.Add(new MemoryConfigurationSource
            {
                InitialData = environment.Cast<DictionaryEntry>()
                    .Where(e => e.Key is string k && k.StartsWith(environmentPrefix, StringComparison.Ordinal))
                    .Select(e => new KeyValuePair<string, string?>(((string)e.Key)[environmentPrefix.Length..], e.Value as string)),
            });
        }
        var given = new Dictionary<string, string?>(StringComparer.Ordinal);
        foreach (Option option in options)
        {
            if (commandLine.GetResult(option) is { Implicit: false } result)
            {
                given[Key(option.Name)] = option.IsFlag() ? "true" : result.Tokens.Count > 0 ? result.Tokens[^1].Value : null;
            }
        }
        builder.Add(new MemoryConfigurationSource { InitialData = given });

        IConfigurationRoot root;
        try
        {
            root = builder.Build();
        }
        catch (Exception e) when (e is FormatException or System.Text.Json.JsonException)
        {
            throw new ArgumentException($"{configFile}: not a JSON object of settings ({e.InnerException?.Message ?? e.Message}); example: {{\"listen\": \"127.0.0.1:10809\"}}", e);
        }

        var values = new Dictionary<string, (string Value, string Source)>(StringComparer.Ordinal);
        IConfigurationProvider[] providers = [.. root.Providers];
        for (int p = 0; p < providers.Length; p++)
        {
            IConfigurationProvider provider = providers[p];
            bool isFile = configFile is not null && p == 0;
            bool isCommandLine = p == providers.Length - 1;
            foreach (string rawKey in provider.GetChildKeys([], null).Distinct(StringComparer.OrdinalIgnoreCase))
            {
                string key = Normalize(rawKey);
                string source = isCommandLine ? CommandLineSource
                    : isFile ? $"in {configFile}"
                    : $"by environment variable {environmentPrefix}{rawKey}";
                if (!isFile && !isCommandLine && key == "config")
                {
                    continue; // the file's own name, handled above
                }
                if (!byKey.TryGetValue(key, out Option? option))
                {
                    throw new ArgumentException(isFile
                        ? $"{configFile}: no setting '{rawKey}' (keys are the long option names of --help, without the dashes)."
                        : $"environment variable {environmentPrefix}{rawKey}: no setting '{key}' (variables are {environmentPrefix} + an option name of --help in capitals, e.g. {environmentPrefix}LISTEN).");
                }
                string? value = Read(provider, rawKey, source);
                if (value is null)
                {
                    continue; // JSON null: not set
                }
                if (option.IsFlag())
                {
                    if (!TryParseBool(value, out bool on))
                    {
                        throw new ArgumentException($"{option.Name}: '{value}' is not true or false (set {source}).");
                    }
                    if (!on)
                    {
                        values.Remove(key); // off here turns off what a weaker source turned on
                        continue;
                    }
                    value = "true";
                }
                values[key] = (value, source);
            }
        }
        return new LayeredSettings(values, configFile, root);
    }

    /// <summary>The value in force for the option (null: not set anywhere; "true" for a flag that is on).</summary>
    public string? Get(Option option) => _values.TryGetValue(Key(option.Name), out var v) ? v.Value : null;

    public bool IsSet(Option option) => _values.ContainsKey(Key(option.Name));

    /// <summary>Where the value in force came from: "on the command line", "in FILE", "by environment variable X".</summary>
    public string? SourceOf(Option option) => _values.TryGetValue(Key(option.Name), out var v) ? v.Source : null;

    /// <summary>
    /// A message about a setting with where it was set appended ("--listen: 'x' is not ADDRESS:PORT
    /// (set in /etc/nbd-server/nbd-server.json)"): the first option name in the message is the setting.
    /// </summary>
    public string Explain(string message)
    {
        int at = message.IndexOf("--", StringComparison.Ordinal);
        if (at < 0)
        {
            return message;
        }
        int end = at + 2;
        while (end < message.Length && (char.IsAsciiLetterLower(message[end]) || char.IsAsciiDigit(message[end]) || message[end] == '-'))
        {
            end++;
        }
        string key = message[(at + 2)..end];
        return _values.TryGetValue(key, out var v) && !message.Contains("(set ", StringComparison.Ordinal) ? $"{message.TrimEnd('.')} (set {v.Source})" : message;
    }

    private static string? Read(IConfigurationProvider provider, string key, string source)
    {
        if (provider.TryGet(key, out string? value))
        {
            return value;
        }
        // A JSON list ("downstairs": ["a:1", "b:2"]) arrives as downstairs:0, downstairs:1.
        var items = new SortedList<int, string>();
        foreach (string child in provider.GetChildKeys([], key).Distinct(StringComparer.OrdinalIgnoreCase))
        {
            if (!int.TryParse(child, NumberStyles.None, CultureInfo.InvariantCulture, out int index) || !provider.TryGet($"{key}:{child}", out string? item) || item is null)
            {
                throw new ArgumentException($"--{Normalize(key)}: must be a string, a number, true/false or a list of them (set {source}).");
            }
            items[index] = item;
        }
        return items.Count == 0 ? null : string.Join(',', items.Values);
    }

    private static bool TryParseBool(string text, out bool value)
    {
        switch (text.Trim().ToLowerInvariant())
        {
            case "1" or "true" or "yes" or "on":
                value = true;
                return true;
            case "0" or "false" or "no" or "off" or "":
                value = false;
                return true;
            default:
                value = false;
                return false;
        }
    }

    private static string Key(string optionName) => optionName.TrimStart('-');

    private static string Normalize(string key) => key.Trim().TrimStart('-').ToLowerInvariant().Replace('_', '-');
}
