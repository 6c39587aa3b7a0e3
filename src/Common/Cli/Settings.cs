using System.CommandLine;

namespace NbdServer.Common.Cli;

/// <summary>
/// The options of our executables. A value option keeps the last of repeated occurrences (as the
/// hand-written parsers did, so a script may append an override); <see cref="Values"/> keeps them all.
/// </summary>
public static class Settings
{
    /// <summary>Most occurrences of one option on a command line (a bound on what a parser collects).</summary>
    private const int MaxRepeats = 1000;

    /// <summary><c>--name VALUE</c>; given twice, the last one counts.</summary>
    public static Option<string[]> Value(string name, string helpName, string description, params string[] choices)
    {
        var option = new Option<string[]>(name)
        {
            HelpName = helpName,
            Description = description,
            Arity = new ArgumentArity(1, MaxRepeats),
            AllowMultipleArgumentsPerToken = false,
        };
        if (choices.Length > 0)
        {
            option.CompletionSources.Add(choices);
        }
        return option;
    }

    /// <summary><c>--name VALUE</c> that may be given several times, each value kept.</summary>
    public static Option<string[]> Values(string name, string helpName, string description) => Value(name, helpName, description);

    /// <summary><c>--name</c>: on when given.</summary>
    public static Option<bool> Flag(string name, string description) => new(name) { Description = description, Arity = ArgumentArity.Zero };

    /// <summary>
    /// Refuses an unknown option where the command takes arguments (System.CommandLine would take
    /// "--typo" as a file name there): a usage error like any other unknown option.
    /// </summary>
    public static T OptionsAreNotArguments<T>(this T argument)
        where T : Argument
    {
        argument.Validators.Add(result =>
        {
            foreach (System.CommandLine.Parsing.Token token in result.Tokens.Where(t => t.Value.StartsWith('-') && t.Value.Length > 1))
            {
                result.AddError($"Unrecognized command or argument '{token.Value}'.");
            }
        });
        return argument;
    }

    /// <summary>The last value given for a value option, or null.</summary>
    public static string? Last(this ParseResult result, Option<string[]> option) =>
        result.GetValue(option) is { Length: > 0 } values ? values[^1] : null;

    /// <summary>Whether the option takes no value (a flag).</summary>
    public static bool IsFlag(this Option option) => option.Arity.MaximumNumberOfValues == 0;
}
